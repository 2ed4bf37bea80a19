"""Probe providers: which programs of the object to load and where to attach them.

Every provider emits the same events (bpf/hairtrace.h), so the analysis never
asks which one ran. Auto mode takes the best that can run and says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from tracer.errors import HairtraceError, UsageError
from tracer.kernel import ksyms
from tracer.kernel.features import Features, kfree_skb_has_reason
from tracer.kernel.libbpf import BpfObject, NetfilterBusy
from tracer.kernel.nfholders import describe, holders

# netfilter hook numbers (enum nf_inet_hooks)
PRE_ROUTING, LOCAL_IN, FORWARD, LOCAL_OUT, POST_ROUTING = 0, 1, 2, 3, 4
HOOK_NAMES = {0: "PREROUTING", 1: "INPUT", 2: "FORWARD", 3: "OUTPUT", 4: "POSTROUTING"}
# the stages the programs bracket (enum nf_ip_hook_priorities)
PRI_CONNTRACK, PRI_NAT_DST, PRI_FILTER, PRI_NAT_SRC = -200, -100, 0, 100


@dataclass(frozen=True)
class NfProgram:
    """A BPF netfilter program and where it sits relative to conntrack and NAT.

    The kernel takes one BPF netfilter link per (netns, hook, priority), so a
    second tracer on the same netns finds `priority` taken; any priority in
    [lo, hi] sees the packet between the same two stages, and serves as well.
    """

    name: str
    hook: int
    priority: int  # first choice, the one bpf/hairtrace.bpf.c names (and puts in events)
    lo: int
    hi: int
    point: int  # the enum ht_point its events carry (bpf/hairtrace.h)

    def priorities(self) -> list[int]:
        """The first choice, then the rest of the window upwards, then below it."""
        return [
            self.priority,
            *range(self.priority + 1, self.hi + 1),
            *range(self.lo, self.priority),
        ]


class Provider(Protocol):
    name: str
    skipped: dict[str, str]  # probe point -> why it is not attached

    def can_run(self, feats: Features) -> str | None: ...

    def prepare(self, obj: BpfObject) -> None: ...

    def attach(self, obj: BpfObject, netns_path: str) -> list[str]: ...

    def exclude_failed(self, log: str) -> bool: ...


class TracepointProvider:
    """tp_btf device/drop/reset tracepoints plus netfilter-hook programs in one netns."""

    name = "tracepoint"
    TRACEPOINTS = ("ht_dev_rx", "ht_dev_tx", "ht_drop", "ht_tcp_reset")
    HOOKS = (
        # after conntrack (the entry exists), before DNAT (the tuple is still the VIP)
        NfProgram("ht_nf_pre_ct", PRE_ROUTING, -199, PRI_CONNTRACK + 1, PRI_NAT_DST - 1, 5),
        # after DNAT, before the filter stage: the translated tuple
        NfProgram("ht_nf_pre_nat", PRE_ROUTING, -99, PRI_NAT_DST + 1, PRI_FILTER - 1, 6),
        NfProgram("ht_nf_out_ct", LOCAL_OUT, -199, PRI_CONNTRACK + 1, PRI_NAT_DST - 1, 7),
        NfProgram("ht_nf_out_nat", LOCAL_OUT, -99, PRI_NAT_DST + 1, PRI_FILTER - 1, 8),
        # after the filter table (a packet it drops never gets here), below SNAT's 100
        NfProgram("ht_nf_forward", FORWARD, 1, PRI_FILTER + 1, PRI_NAT_SRC - 1, 9),
        # after SNAT; 99 slots like the others, far below confirm (INT_MAX) and
        # the conntrack helpers (300)
        NfProgram("ht_nf_post_nat", POST_ROUTING, 101, PRI_NAT_SRC + 1, PRI_NAT_SRC + 99, 10),
        NfProgram("ht_nf_in_nat", LOCAL_IN, 101, PRI_NAT_SRC + 1, PRI_NAT_SRC + 99, 11),
    )

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.skipped: dict[str, str] = {}
        self.priorities: dict[str, int] = {}  # netfilter program -> priority attached at
        self._proc = proc  # where to look for the holders of a full window

    def exclude_failed(self, log: str) -> bool:
        return False

    def can_run(self, feats: Features) -> str | None:
        for need in ("btf", "tp_btf", "netfilter_link", "ringbuf"):
            if need in feats.missing:
                return feats.missing[need]
        return None

    def prepare(self, obj: BpfObject) -> None:
        obj.select(set(self.TRACEPOINTS) | {h.name for h in self.HOOKS})
        for h in self.HOOKS:
            obj.make_netfilter(h.name)

    def attach(self, obj: BpfObject, netns_path: str) -> list[str]:
        for name in self.TRACEPOINTS:
            obj.attach(name)
        for h in self.HOOKS:
            self.priorities[h.name] = self._attach_in_window(obj, h, netns_path)
        return list(self.TRACEPOINTS) + [h.name for h in self.HOOKS]

    def moved(self) -> dict[int, int]:
        """moved_points of the priorities attached at."""
        return moved_points(self.priorities)

    def _attach_in_window(self, obj: BpfObject, h: NfProgram, netns_path: str) -> int:
        """Attach at the first free priority of h's window; the priority used."""
        for prio in h.priorities():
            try:
                obj.attach_netfilter(h.name, netns_path, h.hook, prio)
            except NetfilterBusy:  # held by another BPF netfilter link: try the next
                continue
            return prio
        where = f"{HOOK_NAMES[h.hook]} {h.lo}..{h.hi}"
        held = describe(holders(h.hook, h.lo, h.hi, proc=self._proc))
        raise HairtraceError(
            f"cannot attach {h.name}: another hairtrace (or another BPF netfilter program) "
            f"holds {HOOK_NAMES[h.hook]} priority {h.priority} in {netns_path}, and every "
            f"other priority of {h.lo}..{h.hi} is taken too; "
            + (
                f"BPF netfilter links at {where} (in any netns) are held by {held}"
                if held
                else f"no process holds a BPF netfilter link at {where} open "
                "(pinned? see bpftool link list)"
            )
        )


@dataclass(frozen=True)
class FunctionProbe:
    """A kernel function of the design and the programs that probe it."""

    function: str
    fentry: str | None  # fentry/fexit program name
    kprobe: str | None


FUNCTIONS = (
    FunctionProbe("br_handle_frame", "ht_fe_br_handle_frame", "ht_kp_br_handle_frame"),
    FunctionProbe("br_forward", "ht_fe_br_forward", "ht_kp_br_forward"),
    FunctionProbe("br_pass_frame_up", "ht_fe_br_pass_up", "ht_kp_br_pass_up"),
    FunctionProbe("br_dev_xmit", "ht_fe_br_dev_xmit", "ht_kp_br_dev_xmit"),
    FunctionProbe("br_nf_pre_routing", "ht_fe_br_nf_pre_routing", "ht_kp_br_nf_pre_routing"),
    FunctionProbe("nf_conntrack_in", "ht_fx_ct_in", "ht_kp_ct_in"),
    FunctionProbe("__nf_conntrack_confirm", "ht_fx_ct_confirm", "ht_kp_ct_confirm"),
    FunctionProbe("nf_nat_manip_pkt", "ht_fe_nat_manip", "ht_kp_nat_manip"),
    FunctionProbe("nf_nat_setup_info", "ht_fx_nat_setup", None),
    FunctionProbe("tcp_v4_send_reset", "ht_fe_tcp_v4_send_reset", "ht_kp_tcp_v4_send_reset"),
)
# device and drop tracepoints complete the function probes (resets come from tcp_v4_send_reset)
FUNCTION_TRACEPOINTS = ("ht_dev_rx", "ht_dev_tx", "ht_drop")
# their raw-tracepoint twins, for kprobes on a kernel without BTF of its own (--btf)
RAW_TRACEPOINTS = ("ht_rtp_dev_rx", "ht_rtp_dev_tx", "ht_rtp_drop")
RAW_DROP_NO_REASON = "ht_rtp_drop_noreason"  # kfree_skb before 5.17
_FAILED_PROG = re.compile(r"prog '(\w+)': (?:failed to|BPF program load failed)")


def _why(log: str, prog: str) -> str:
    """The verifier's own reason (the lines before its 'processed N insns'), else libbpf's."""
    lines = [ln.strip() for ln in log.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("processed ") and "insns" in line and i > 0:
            return "; ".join(lines[max(0, i - 2) : i])[:240]
    return next((ln for ln in lines if prog in ln and "fail" in ln), "unknown")[:200]


class FunctionProvider:
    """fentry/fexit or kprobe programs on the bridge, conntrack and NAT functions.

    Functions this kernel lacks (not built, module not loaded, inlined) are
    skipped with the reason; the tracepoints for devices and drops are always on.
    """

    def __init__(self, kind: str) -> None:
        self.name = kind
        self.skipped: dict[str, str] = {}
        self._programs: dict[str, str] = {}  # program -> function
        self.tracepoints: tuple[str, ...] = FUNCTION_TRACEPOINTS

    def can_run(self, feats: Features) -> str | None:
        """Why not, or None. kprobes without tp_btf (no kernel BTF, --btf given) take
        the raw-tracepoint twins of the device and drop tracepoints."""
        needs = ["btf", "ringbuf", "fentry" if self.name == "fentry" else "kprobes"]
        if self.name == "fentry":
            needs.append("tp_btf")
        for need in needs:
            if need in feats.missing:
                return feats.missing[need]
        if self.name == "kprobe" and "tp_btf" in feats.missing:
            drop = "ht_rtp_drop" if kfree_skb_has_reason() else RAW_DROP_NO_REASON
            self.tracepoints = (*RAW_TRACEPOINTS[:2], drop)
        return None

    def candidates(self) -> dict[str, str]:
        """Program -> function for the functions this kernel has (the others go to skipped)."""
        wanted = {f.function for f in FUNCTIONS}
        syms = ksyms.load(wanted)
        progs: dict[str, str] = {}
        for f in FUNCTIONS:
            prog = f.fentry if self.name == "fentry" else f.kprobe
            if prog is None:
                self.skipped[f.function] = f"no {self.name} program (by design)"
            elif syms.module_of(f.function) is None:
                self.skipped[f.function] = (
                    "not in /proc/kallsyms (not built, module not loaded, or inlined)"
                )
            else:
                progs[prog] = f.function
        return progs

    def prepare(self, obj: BpfObject) -> None:
        if not self._programs:
            self._programs = self.candidates()
        obj.select(set(self._programs) | set(self.tracepoints))

    def exclude_failed(self, log: str) -> bool:
        """After a failed load: drop the function program libbpf names, if any."""
        for prog in _FAILED_PROG.findall(log):
            if prog in self._programs:
                func = self._programs.pop(prog)
                self.skipped[func] = f"{self.name} program refused: {_why(log, prog)}"
                return True
        return False

    def attach(self, obj: BpfObject, netns_path: str) -> list[str]:
        for name in self.tracepoints:
            obj.attach(name)
        attached = list(self.tracepoints)
        for prog, func in list(self._programs.items()):
            try:
                obj.attach(prog)
            except HairtraceError as exc:
                self.skipped[func] = f"attach failed: {str(exc).splitlines()[0]}"
                continue
            attached.append(prog)
        return attached


def all_providers() -> list[Provider]:
    """Best first: fentry > kprobe > tracepoint."""
    return [FunctionProvider("fentry"), FunctionProvider("kprobe"), TracepointProvider()]


def choose(name: str, feats: Features, custom_btf: bool = False) -> tuple[Provider, str]:
    """The provider to use and a sentence saying why.

    custom_btf: an external BTF file stands in for the kernel's in CO-RE
    relocations; tp_btf and fentry still need the kernel's own.
    """
    if "privileges" in feats.missing:
        raise HairtraceError(feats.missing["privileges"])
    if "btf" in feats.missing and custom_btf:
        why = "needs the kernel's own BTF (an external BTF file serves CO-RE relocations only)"
        missing = {k: v for k, v in feats.missing.items() if k != "btf"}
        missing.setdefault("tp_btf", f"tp_btf {why}")
        missing.setdefault("fentry", f"fentry {why}")
        feats = replace(feats, missing=missing)
    if "btf" in feats.missing:
        raise HairtraceError(feats.missing["btf"])
    providers = {p.name: p for p in all_providers()}
    if name != "auto":
        if name not in providers:
            raise UsageError(f"unknown provider '{name}' (auto, {', '.join(providers)})")
        reason = providers[name].can_run(feats)
        if reason:
            raise HairtraceError(f"provider {name} cannot run here: {reason}")
        return providers[name], f"{name} (requested)"
    skipped: list[str] = []
    for p in providers.values():
        reason = p.can_run(feats)
        if reason is None:
            why = f"; skipped {'; '.join(skipped)}" if skipped else ""
            return p, f"{p.name} (auto: best that can run{why})"
        skipped.append(f"{p.name}: {reason}")
    raise HairtraceError("no probe provider can run here: " + "; ".join(skipped))


def moved_points(priorities: dict[str, int]) -> dict[int, int]:
    """ht_point -> priority, for the netfilter programs attached at another priority than
    the one compiled into them (and so into their events' nf_prio); priorities: program
    name -> priority attached at."""
    return {
        h.point: priorities[h.name]
        for h in TracepointProvider.HOOKS
        if priorities.get(h.name, h.priority) != h.priority
    }
