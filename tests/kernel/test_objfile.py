"""Where the BPF object and the bcc source are found: $HAIRTRACE_BPF_OBJ, the checkout, the
wheel's copy, in that order; one clear error when none has them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracer.errors import HairtraceError
from tracer.kernel import bcc_backend, objfile

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An empty fake checkout bpf/ and an empty fake packaged tracer/bpf/."""
    checkout, packaged = tmp_path / "checkout" / "bpf", tmp_path / "site" / "tracer" / "bpf"
    (checkout / "build").mkdir(parents=True)
    packaged.mkdir(parents=True)
    monkeypatch.setattr(objfile, "CHECKOUT_BPF", checkout)
    monkeypatch.setattr(objfile, "PACKAGED_BPF", packaged)
    monkeypatch.delenv(objfile.ENV, raising=False)
    return checkout, packaged


def test_running_from_this_checkout_uses_its_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(objfile.ENV, raising=False)
    assert objfile.CHECKOUT_BPF == REPO / "bpf"
    if (REPO / "bpf" / "build" / objfile.OBJECT).is_file():
        assert objfile.find_object() == (REPO / "bpf" / "build" / objfile.OBJECT, "checkout")
    assert objfile.find_source() == (REPO / "bpf" / "hairtrace.bpf.c", "checkout")


def test_object_order_env_then_checkout_then_package(
    places: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout, packaged = places
    with pytest.raises(HairtraceError) as exc:
        objfile.find_object()
    msg = str(exc.value)
    assert "\n" not in msg and "scripts/setup" in msg and "scripts/build-wheel" in msg
    assert str(checkout / "build" / objfile.OBJECT) in msg and str(packaged) in msg

    (packaged / objfile.OBJECT).write_bytes(b"p")
    assert objfile.find_object() == (packaged / objfile.OBJECT, "package")
    (checkout / "build" / objfile.OBJECT).write_bytes(b"c")
    assert objfile.find_object() == (checkout / "build" / objfile.OBJECT, "checkout")

    mine = tmp_path / "mine.o"
    monkeypatch.setenv(objfile.ENV, str(mine))
    with pytest.raises(HairtraceError, match="HAIRTRACE_BPF_OBJ"):
        objfile.find_object()  # set but missing: an error, not a silent fallback
    mine.write_bytes(b"m")
    assert objfile.object_path() == mine


def test_bcc_source_needs_its_headers_beside_it(places: tuple[Path, Path]) -> None:
    checkout, packaged = places
    for name in objfile.BCC_SOURCES:
        (packaged / name).write_text("/* */\n")
    (checkout / "hairtrace.bpf.c").write_text("/* a checkout without its headers */\n")
    assert objfile.find_source() == (packaged / "hairtrace.bpf.c", "package")
    flags = bcc_backend.cflags("10.0.0.1", 80, perf=False, ringbuf_bytes=None)
    assert f"-I{packaged}" in flags  # bcc finds compat.h and hairtrace.h there
    for name in objfile.BCC_SOURCES[1:]:
        (checkout / name).write_text("/* */\n")
    assert objfile.source_path() == checkout / "hairtrace.bpf.c"
    for name in objfile.BCC_SOURCES:
        (checkout / name).unlink()
        (packaged / name).unlink()
    with pytest.raises(HairtraceError, match="scripts/build-wheel"):
        objfile.find_source()
