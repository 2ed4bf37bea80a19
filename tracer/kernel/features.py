"""What this kernel and process can do for tracing, each missing thing with a reason."""

from __future__ import annotations

import ctypes
import errno
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

from tracer.kernel.btf import KIND_FUNC, kernel_btf_path
from tracer.kernel.libbpf import BPF_MAP_TYPE_RINGBUF, Libbpf

# capability bits (include/uapi/linux/capability.h)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39


@dataclass(frozen=True)
class Features:
    """Facts about the running kernel; `missing` maps a feature to why it is unavailable."""

    kernel: str
    privileged: bool
    btf: bool
    tp_btf: bool
    netfilter_link: bool
    ringbuf: bool
    kprobes: bool
    fentry: bool = False
    missing: dict[str, str] = field(default_factory=dict)
    # bpf_rdonly_cast (Linux 6.2+): the filter reads headers with direct loads
    # (hairtrace.bpf.o), else with helper copies (hairtrace-copy.bpf.o)
    direct_reads: bool = False


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def privileged() -> str | None:
    """None when we may load and attach BPF, else why not."""
    caps = _effective_caps()

    def have(bit: int) -> bool:
        return bool(caps >> bit & 1)

    if have(CAP_SYS_ADMIN) or (have(CAP_BPF) and have(CAP_PERFMON) and have(CAP_NET_ADMIN)):
        return None
    who = "not root" if os.geteuid() != 0 else "root without the needed capabilities"
    return f"{who}: tracing needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (run with sudo)"


def _btf_has_names(names: list[bytes]) -> dict[bytes, bool]:
    """Cheap presence test on the BTF string table (a full parse takes ~1 s)."""
    try:
        data = kernel_btf_path().read_bytes()
    except OSError:
        return {n: False for n in names}
    return {n: (b"\0" + n + b"\0") in data for n in names}


def kernel_config(option: str) -> str | None:
    """Value of a CONFIG_ option from /proc/config.gz or /boot/config-*, None if unknown."""
    release = os.uname().release
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
        for line in text.splitlines():
            if line.startswith(option + "="):
                return line.split("=", 1)[1]
            if line == f"# {option} is not set":
                return "n"
    return None


def probe(lib: Libbpf | None = None) -> Features:
    """Probe the kernel; with libbpf also the ring buffer and fentry by real loads."""
    missing: dict[str, str] = {}
    why = privileged()
    if why:
        missing["privileges"] = why
    btf_path = kernel_btf_path()
    btf = btf_path.exists()
    if not btf:
        missing["btf"] = (
            f"no kernel BTF at {btf_path}: the kernel was built without CONFIG_DEBUG_INFO_BTF"
        )
    names = _btf_has_names([b"btf_trace_netif_receive_skb", b"bpf_nf_ctx", b"bpf_rdonly_cast"])
    tp_btf = btf and names[b"btf_trace_netif_receive_skb"]
    if btf and not tp_btf:
        missing["tp_btf"] = "kernel BTF has no btf_trace_netif_receive_skb (tp_btf unsupported)"
    nf_link = btf and names[b"bpf_nf_ctx"]
    if btf and not nf_link:
        missing["netfilter_link"] = "no BPF netfilter programs (needs Linux 6.4+)"
    direct = btf and names[b"bpf_rdonly_cast"]
    if btf and not direct:
        missing["direct_reads"] = ("no bpf_rdonly_cast (Linux before 6.2): the filter copies "
                                   "headers with a helper")  # fmt: skip
    kprobes = kernel_config("CONFIG_KPROBES") not in ("n",) and (
        Path("/sys/bus/event_source/devices/kprobe").exists()
    )
    if not kprobes:
        missing["kprobes"] = "kernel built without CONFIG_KPROBES"
    status = lib.map_type_status(BPF_MAP_TYPE_RINGBUF) if lib and why is None else int(btf)
    if status == -errno.EPERM:
        missing["ringbuf"] = ("bpf() not permitted (in a container: the seccomp profile "
                              "allows it only with CAP_SYS_ADMIN)")  # fmt: skip
    elif status != 1:
        missing["ringbuf"] = "BPF ring buffer maps unsupported (needs Linux 5.8+)"
    ringbuf = status == 1
    fentry_why = "needs kernel BTF" if not btf else "needs privileges" if why else None
    if fentry_why is None:
        fentry_why = probe_fentry(lib) if lib is not None else "not probed"
    if fentry_why:
        missing["fentry"] = fentry_why
    return Features(
        os.uname().release, why is None, btf, tp_btf, nf_link, ringbuf, kprobes,
        fentry_why is None, missing, direct,
    )  # fmt: skip


BPF_PROG_LOAD, BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY = 5, 26, 24


def probe_fentry(lib: Libbpf, target: str = "tcp_v4_send_reset") -> str | None:
    """Load the smallest fentry program there is; None when it loads, else why not.

    Kernels may have BTF and still refuse trampolines (lockdown, an LSM, no
    arch support), so only a real load tells.
    """
    ids = lib.btf_ids(str(kernel_btf_path()), {target}, KIND_FUNC)
    if target not in ids:
        return f"{target} not in kernel BTF, cannot test fentry"
    insns = (ctypes.c_uint64 * 2)(0xB7, 0x95)  # r0 = 0; exit
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    for off, val in (
        (0, BPF_PROG_TYPE_TRACING),
        (4, 2),
        (68, BPF_TRACE_FENTRY),
        (108, ids[target]),
    ):
        ctypes.c_uint32.from_buffer(attr, off).value = val
    ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(insns)
    ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(license_)
    fd = lib.bpf_syscall(BPF_PROG_LOAD, attr)
    if fd >= 0:
        os.close(fd)
        return None
    return f"the kernel refuses fentry programs ({os.strerror(-fd)})"


KFREE_SKB_FORMATS = (
    Path("/sys/kernel/tracing/events/skb/kfree_skb/format"),
    Path("/sys/kernel/debug/tracing/events/skb/kfree_skb/format"),
)


def kfree_skb_has_reason(release: str | None = None) -> bool:
    """Does this kernel's kfree_skb tracepoint carry a drop reason (Linux 5.17+)?

    The tracepoint's format file says; without tracefs, the headers' trace/events/skb.h.
    """
    for fmt in KFREE_SKB_FORMATS:
        try:
            return "reason" in fmt.read_text()
        except OSError:
            continue
    kdir = Path("/lib/modules") / (release or os.uname().release)
    for sub in ("source", "build"):
        try:
            return "skb_drop_reason" in (kdir / sub / "include/trace/events/skb.h").read_text()
        except OSError:
            continue
    return True
