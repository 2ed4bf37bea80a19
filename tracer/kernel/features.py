"""What this kernel and process can do for tracing, each missing thing with a reason."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

from tracer.kernel.btf import kernel_btf_path

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
    missing: dict[str, str] = field(default_factory=dict)


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


def probe(ringbuf_ok: bool | None = None) -> Features:
    """Probe the kernel. ringbuf_ok comes from libbpf's map-type probe when available."""
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
    names = _btf_has_names([b"btf_trace_netif_receive_skb", b"bpf_nf_ctx"])
    tp_btf = btf and names[b"btf_trace_netif_receive_skb"]
    if btf and not tp_btf:
        missing["tp_btf"] = "kernel BTF has no btf_trace_netif_receive_skb (tp_btf unsupported)"
    nf_link = btf and names[b"bpf_nf_ctx"]
    if btf and not nf_link:
        missing["netfilter_link"] = "no BPF netfilter programs (needs Linux 6.4+)"
    kprobes = kernel_config("CONFIG_KPROBES") not in ("n",) and (
        Path("/sys/bus/event_source/devices/kprobe").exists()
    )
    if not kprobes:
        missing["kprobes"] = "kernel built without CONFIG_KPROBES"
    ringbuf = bool(ringbuf_ok) if ringbuf_ok is not None else btf
    if not ringbuf:
        missing["ringbuf"] = "BPF ring buffer maps unsupported (needs Linux 5.8+)"
    return Features(
        os.uname().release, why is None, btf, tp_btf, nf_link, ringbuf, kprobes, missing
    )
