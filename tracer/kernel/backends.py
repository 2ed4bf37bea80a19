"""Which BPF toolchain runs the probes: libbpf CO-RE (needs BTF) or bcc (needs kernel headers).

Both build the same bpf/hairtrace.bpf.c and produce the same events; the
rest of hairtrace only sees a `Loaded` tracer. Auto takes CO-RE where the
kernel has BTF (or --btf names a BTF file), bcc where it has headers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from tracer.errors import HairtraceError, UsageError
from tracer.kernel.btf import kernel_btf_path

BACKENDS = ("auto", "core", "bcc")
BCC_PYTHON = Path("/usr/lib/python3/dist-packages")  # Debian's python3-bpfcc


class EventReader(Protocol):
    """Drains raw event records: the ring-buffer readers, bcc's perf buffer."""

    def wait(self, timeout_ms: int) -> bool: ...

    def drain(self, max_bytes: int | None = None) -> np.ndarray: ...

    def close(self) -> None: ...


class LoadedObject(Protocol):
    """The loaded programs and maps: detach, close."""

    def detach_all(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Loaded:
    """A tracer loaded by one backend, configured, not yet attached."""

    backend: str
    backend_reason: str
    provider: str
    provider_reason: str
    obj: LoadedObject
    attach: Callable[[str], list[str]]  # netns path -> attached program names
    open_reader: Callable[[], EventReader]
    ring_bytes: int  # size of the event buffer (the drain loop paces itself by it)
    # the per-point counters now: emitted, lost, over budget, HT_PT_MAX u64 each
    counters: Callable[[], bytes]
    skipped: dict[str, str] = field(default_factory=dict)  # filled while attaching
    compile_seconds: float | None = None  # bcc: its compile at start-up
    # after attach: netfilter program -> priority it sits at (another than its compiled
    # one when a second tracer holds that: see providers.moved_points)
    nf_priorities: Callable[[], dict[str, int]] = dict


def headers_dir(release: str | None = None) -> Path:
    return Path("/lib/modules") / (release or os.uname().release) / "build"


def has_headers(release: str | None = None) -> bool:
    """The running kernel's headers package is installed (what bcc compiles against)."""
    return (headers_dir(release) / "include").is_dir()


def bcc_missing() -> str | None:
    """None when bcc's Python module can be imported, else what to install."""
    if (BCC_PYTHON / "bcc" / "__init__.py").is_file():
        return None
    return "bcc's Python module is not installed: apt-get install python3-bpfcc (or scripts/setup --with-bcc)"


def _headers_hint(release: str) -> str:
    return f"install this kernel's headers package (e.g. apt-get install linux-headers-{release})"


def choose_backend(name: str, btf_file: str | None = None) -> tuple[str, str]:
    """The backend to use and a sentence saying why; one clear error when none can run."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend '{name}' ({', '.join(BACKENDS)})")
    release = os.uname().release
    kbtf = kernel_btf_path()
    if btf_file is not None and not Path(btf_file).is_file():
        raise UsageError(f"--btf {btf_file}: no such file")
    btf = btf_file is not None or kbtf.exists()
    btf_where = f"--btf {btf_file}" if btf_file else f"kernel BTF at {kbtf}"
    headers = has_headers(release)
    hdir = headers_dir(release)
    if name == "core":
        if not btf:
            raise HairtraceError(
                f"backend core cannot run here: no kernel BTF at {kbtf} (kernel built without "
                "CONFIG_DEBUG_INFO_BTF); pass --btf FILE (an external BTF file for this kernel) "
                "or use --backend bcc"
            )
        return "core", f"core (requested; {btf_where})"
    if name == "bcc":
        if not headers:
            raise HairtraceError(
                f"backend bcc cannot run here: no kernel headers for {release} at {hdir}: "
                f"{_headers_hint(release)}"
                + ("" if not btf else "; or use --backend core (this kernel has BTF)")
            )
        missing = bcc_missing()
        if missing:
            raise HairtraceError(f"backend bcc cannot run here: {missing}")
        return "bcc", f"bcc (requested; kernel headers at {hdir})"
    if btf:
        return "core", f"core (auto: {btf_where})"
    if headers and bcc_missing() is None:
        return "bcc", f"bcc (auto: no kernel BTF at {kbtf}; kernel headers at {hdir})"
    if headers:
        raise HairtraceError(
            f"no kernel BTF at {kbtf}, and the bcc backend that would use the kernel headers at "
            f"{hdir} cannot run: {bcc_missing()}; or pass --btf FILE (an external BTF file)"
        )
    raise HairtraceError(
        f"cannot trace on this kernel: no kernel BTF at {kbtf} and no kernel headers at {hdir}. "
        f"Either {_headers_hint(release)} for the bcc backend, or pass --btf FILE with an "
        "external BTF file for this kernel (e.g. from BTFHub) for the CO-RE backend"
    )
