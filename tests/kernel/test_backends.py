"""Backend choice (CO-RE vs bcc), the bcc build's config macros, and where backend shows up."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.errors import HairtraceError, UsageError
from tracer.kernel import backends
from tracer.kernel.backends import choose_backend

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A fake kernel: set(btf=..., headers=..., bcc=...) decides what exists."""
    btf = tmp_path / "vmlinux"
    build = tmp_path / "build"
    monkeypatch.setenv("HAIRTRACE_KERNEL_BTF", str(btf))
    monkeypatch.setattr(backends, "headers_dir", lambda release=None: build)
    monkeypatch.setattr(backends, "BCC_PYTHON", tmp_path / "dist-packages")

    def setup(*, btf_: bool, headers: bool, bcc: bool = True) -> None:
        if btf_:
            btf.write_bytes(b"btf")
        if headers:
            (build / "include").mkdir(parents=True)
        if bcc:
            pkg = tmp_path / "dist-packages" / "bcc"
            pkg.mkdir(parents=True)
            (pkg / "__init__.py").write_text("")

    return setup


def test_auto_takes_core_where_there_is_btf(kernel) -> None:  # type: ignore[no-untyped-def]
    kernel(btf_=True, headers=True)
    name, why = choose_backend("auto")
    assert name == "core" and "auto" in why and "kernel BTF" in why


def test_auto_takes_bcc_without_btf_but_with_headers(kernel) -> None:  # type: ignore[no-untyped-def]
    kernel(btf_=False, headers=True)
    name, why = choose_backend("auto")
    assert name == "bcc" and "no kernel BTF" in why and "headers" in why


def test_neither_btf_nor_headers_names_both_ways_out(kernel) -> None:  # type: ignore[no-untyped-def]
    kernel(btf_=False, headers=False)
    with pytest.raises(HairtraceError) as exc:
        choose_backend("auto")
    msg = str(exc.value)
    assert f"linux-headers-{os.uname().release}" in msg and "--btf FILE" in msg
    assert "\n" not in msg


def test_bcc_requested_without_headers_says_which_package(kernel) -> None:  # type: ignore[no-untyped-def]
    kernel(btf_=True, headers=False)
    with pytest.raises(HairtraceError, match=r"backend bcc cannot run here: no kernel headers"):
        choose_backend("bcc")


def test_bcc_requested_without_bcc_module_says_what_to_install(kernel) -> None:  # type: ignore[no-untyped-def]
    kernel(btf_=True, headers=True, bcc=False)
    with pytest.raises(HairtraceError, match="python3-bpfcc"):
        choose_backend("bcc")


def test_core_requested_without_btf_points_at_btf_option(kernel) -> None:  # type: ignore[no-untyped-def]
    kernel(btf_=False, headers=True)
    with pytest.raises(HairtraceError, match="--btf FILE"):
        choose_backend("core")


def test_external_btf_file_makes_core_possible(kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kernel(btf_=False, headers=False)
    ext = tmp_path / "ext.btf"
    ext.write_bytes(b"btf")
    name, why = choose_backend("auto", str(ext))
    assert name == "core" and str(ext) in why
    with pytest.raises(UsageError, match="no such file"):
        choose_backend("core", str(tmp_path / "missing.btf"))


def test_unknown_backend_is_usage_error() -> None:
    with pytest.raises(UsageError):
        choose_backend("gcc")


def test_bcc_cflags_store_the_config_as_the_rodata_would() -> None:
    from tracer.kernel.bcc_backend import cflags

    flags = cflags("100.67.30.133", 80, perf=True, ringbuf_bytes=1 << 16, data_budget=8)
    macros = dict(f[2:].split("=", 1) for f in flags if f.startswith("-D") and "=" in f)
    addr = int(macros["HT_CFG_SVC_ADDR"].rstrip("U"), 16)
    assert struct.pack("=I", addr) == socket.inet_aton("100.67.30.133")
    assert struct.pack("=H", int(macros["HT_CFG_SVC_PORT"], 16)) == (80).to_bytes(2, "big")
    assert "-DHT_BCC" in flags and "-DHT_PERF_OUTPUT" in flags
    assert macros["HT_RINGBUF_PAGES"] == "16" and macros["HT_CFG_DATA_BUDGET"] == "8"


def test_core_path_does_not_import_bcc() -> None:
    code = "import sys, tracer.cli, tracer.trace; print('bcc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout  # fmt: skip
    assert out.strip() == "False"


def test_cli_backend_bcc_without_headers_is_one_clear_error(tmp_path: Path) -> None:
    """The host case: no headers for the running kernel (a fake module dir stands in)."""
    code = (
        "import sys; from tracer.kernel import backends; from pathlib import Path; "
        f"backends.headers_dir = lambda release=None: Path({str(tmp_path)!r}); "
        "from tracer.cli import main; sys.argv[0] = 'hairtrace'; main()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "--svc", "100.67.30.133:80", "--backend", "bcc",
         "--no-live", "--duration", "1"],
        capture_output=True, text=True, check=False, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert "backend bcc cannot run here: no kernel headers" in line
    assert f"linux-headers-{os.uname().release}" in line


def _load_with_btf(obj_path: Path, btf: str) -> None:
    from tracer.kernel.libbpf import BpfObject, Libbpf

    lib = Libbpf()
    obj = BpfObject(lib, str(obj_path), btf_custom_path=btf)
    try:
        obj.select({"ht_dev_rx", "ht_drop"})
        obj.load()  # CO-RE relocations against btf: no attach, nothing traced
    finally:
        obj.close()


def test_core_loader_takes_an_external_btf_file(bpf_object: Path, tmp_path: Path) -> None:
    """--btf reaches libbpf (btf_custom_path): a real BTF file loads, a bogus one fails."""
    from conftest import needs_bpf

    needs_bpf()
    from tracer.kernel.btf import VMLINUX

    _load_with_btf(bpf_object, str(VMLINUX))
    bogus = tmp_path / "bogus.btf"
    bogus.write_bytes(b"\0" * 64)
    with pytest.raises(HairtraceError):
        _load_with_btf(bpf_object, str(bogus))


def test_kfree_skb_reason_from_the_tracepoint_format(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Kernels before 5.17 have no drop reason: the bcc build and the raw-tracepoint twin
    must not read a third argument."""
    from tracer.kernel import bcc_backend, features

    fmt = tmp_path / "format"
    monkeypatch.setattr(features, "KFREE_SKB_FORMATS", (tmp_path / "absent", fmt))
    fmt.write_text(
        "field:void * skbaddr;\nfield:void * location;\nfield:unsigned short protocol;\n"
    )
    assert features.kfree_skb_has_reason() is False
    fmt.write_text("field:void * location;\nfield:enum skb_drop_reason reason;\n")
    assert features.kfree_skb_has_reason() is True
    flags = bcc_backend.cflags("10.0.0.1", 0, perf=False, ringbuf_bytes=None, drop_reason=False)
    assert "-DHT_KFREE_SKB_NO_REASON" in flags and "-DHT_PERF_OUTPUT" not in flags
