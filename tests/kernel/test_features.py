"""What features.probe says when the ring buffer cannot be had: not permitted (a seccomp
profile refusing bpf(), as podman's default does without CAP_SYS_ADMIN) is not "needs
Linux 5.8+"."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tracer.kernel import features


class _Lib:
    def __init__(self, status: int) -> None:
        self.status = status

    def map_type_status(self, _map_type: int) -> int:
        return self.status


@pytest.mark.parametrize(
    ("status", "ok", "says"),
    [(1, True, None), (0, False, "needs Linux 5.8+"), (-errno.EPERM, False, "not permitted")],
)
def test_the_ring_buffer_probe_names_why(
    status: int, ok: bool, says: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(features, "privileged", lambda: None)
    monkeypatch.setattr(features, "probe_fentry", lambda _lib: None)
    got = features.probe(_Lib(status))  # type: ignore[arg-type]
    assert got.ringbuf is ok
    if says is None:
        assert "ringbuf" not in got.missing
    else:
        assert says in got.missing["ringbuf"]


def test_libbpf_log_keeps_warnings_not_debug_chatter(bpf_object: Path, tmp_path: Path) -> None:
    """Warnings (the verifier's log on a failure) are kept to explain it; the hundreds of
    debug lines opening an object prints are dropped before they are formatted."""
    from tracer.errors import HairtraceError
    from tracer.kernel.libbpf import BpfObject, Libbpf

    lib = Libbpf()
    obj = BpfObject(lib, str(bpf_object))  # libbpf debug-logs every ELF section it reads
    obj.close()
    assert lib.log.lines == []
    bad = tmp_path / "not-an-object.o"
    bad.write_bytes(b"not ELF")
    with pytest.raises(HairtraceError):
        BpfObject(lib, str(bad))
    assert lib.log.lines and all("libbpf:" in line for line in lib.log.lines)
