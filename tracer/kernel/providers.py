"""Probe providers: which programs of the object to load and where to attach them.

Every provider emits the same events (bpf/hairtrace.h), so the analysis never
asks which one ran. Auto mode takes the best that can run and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tracer.errors import HairtraceError, UsageError
from tracer.kernel.features import Features
from tracer.kernel.libbpf import BpfObject

# netfilter hook numbers (enum nf_inet_hooks)
PRE_ROUTING, LOCAL_IN, FORWARD, LOCAL_OUT, POST_ROUTING = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class NfProgram:
    """A BPF netfilter program and where it sits relative to conntrack and NAT."""

    name: str
    hook: int
    priority: int  # conntrack -200, DNAT -100, filter 0, SNAT 100


class Provider(Protocol):
    name: str

    def can_run(self, feats: Features) -> str | None: ...

    def prepare(self, obj: BpfObject) -> None: ...

    def attach(self, obj: BpfObject, netns_path: str) -> list[str]: ...


class TracepointProvider:
    """tp_btf device/drop/reset tracepoints plus netfilter-hook programs in one netns."""

    name = "tracepoint"
    TRACEPOINTS = ("ht_dev_rx", "ht_dev_tx", "ht_drop", "ht_tcp_reset")
    HOOKS = (
        NfProgram("ht_nf_pre_ct", PRE_ROUTING, -199),
        NfProgram("ht_nf_pre_nat", PRE_ROUTING, -99),
        NfProgram("ht_nf_out_ct", LOCAL_OUT, -199),
        NfProgram("ht_nf_out_nat", LOCAL_OUT, -99),
        NfProgram("ht_nf_forward", FORWARD, 1),
        NfProgram("ht_nf_post_nat", POST_ROUTING, 101),
        NfProgram("ht_nf_in_nat", LOCAL_IN, 101),
    )

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
            obj.attach_netfilter(h.name, netns_path, h.hook, h.priority)
        return list(self.TRACEPOINTS) + [h.name for h in self.HOOKS]


class _Unavailable:
    """A provider of the design not built yet: says so instead of pretending."""

    def __init__(self, name: str) -> None:
        self.name = name

    def can_run(self, feats: Features) -> str | None:
        return f"the {self.name} provider is not implemented in this version"

    def prepare(self, obj: BpfObject) -> None:
        raise HairtraceError(
            self.can_run(Features("", False, False, False, False, False, False)) or ""
        )

    def attach(self, obj: BpfObject, netns_path: str) -> list[str]:
        raise HairtraceError(f"the {self.name} provider cannot attach")


def all_providers() -> list[Provider]:
    """Best first: fentry > kprobe > tracepoint."""
    return [_Unavailable("fentry"), _Unavailable("kprobe"), TracepointProvider()]


def choose(name: str, feats: Features) -> tuple[Provider, str]:
    """The provider to use and a sentence saying why."""
    if "privileges" in feats.missing:
        raise HairtraceError(feats.missing["privileges"])
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
