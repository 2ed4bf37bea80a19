"""What a session file says about its recording: the header (start) and footer (end).

Both are JSON chunks (tracer.session.format). from_dict checks every field it
reads and turns anything malformed into one HairtraceError line; keys it does
not know are ignored, so later versions may add fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracer.analysis.context import ConntrackStats, RuleDrop, SysctlChange
from tracer.errors import HairtraceError
from tracer.events.codec import EVENT_SIZE
from tracer.session.format import FORMAT_MINOR, FORMAT_NAME
from tracer.topology.model import Topology

CLOCK = "CLOCK_MONOTONIC"  # the clock of ht_event.ts_ns (bpf_ktime_get_ns)


@dataclass(frozen=True)
class SessionHeader:
    """Everything known when recording starts: how, where, what was traced, and the topology.

    start_ns is the CLOCK_MONOTONIC origin that event timestamps are reported against,
    started_at the wall-clock time (seconds since the epoch) at that same instant, so
    wall(ts_ns) = started_at + (ts_ns - start_ns) / 1e9. drop_reasons are the names of
    enum skb_drop_reason on the recording kernel (numbers differ between kernels).
    format_minor: below 1, the records hold kernel addresses (tracer.session.format).
    """

    tool_version: str
    kernel: str
    hostname: str
    provider: str
    provider_reason: str
    service_ip: str
    service_port: int  # 0 = any port
    netns: str
    start_ns: int
    started_at: float | None
    topology: Topology
    attached: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    attach_seconds: float | None = None
    trace_attach_seconds: float | None = None
    command: tuple[str, ...] = ()
    drop_reasons: dict[int, str] = field(default_factory=dict)
    record_size: int = EVENT_SIZE
    netns_inode: int | None = None  # the node netns (scope of the analysis)
    all_netns: bool = False  # the trace analysed every namespace, not only the node's
    backend: str = "core"  # core (libbpf CO-RE) | bcc; recordings before it were core
    backend_reason: str = ""
    compile_seconds: float | None = None
    format_minor: int = FORMAT_MINOR
    nf_priorities: dict[str, int] = field(default_factory=dict)  # absent before: {}
    protocols: tuple[str, ...] = ("tcp",)  # traced; absent before format 1.2: TCP only
    service_prefix: int = 32  # --svc CIDR: service_ip/service_prefix; absent before: 32

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_minor": self.format_minor,
            "tool_version": self.tool_version,
            "kernel": self.kernel,
            "hostname": self.hostname,
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "service_ip": self.service_ip,
            "service_port": self.service_port,
            "netns": self.netns,
            "clock": CLOCK,
            "start_ns": self.start_ns,
            "started_at": self.started_at,
            "attached": list(self.attached),
            "skipped": dict(self.skipped),
            "attach_seconds": self.attach_seconds,
            "trace_attach_seconds": self.trace_attach_seconds,
            "command": list(self.command),
            "drop_reasons": {str(k): v for k, v in sorted(self.drop_reasons.items())},
            "netns_inode": self.netns_inode,
            "all_netns": self.all_netns,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "compile_seconds": self.compile_seconds,
            "nf_priorities": dict(self.nf_priorities),
            "protocols": list(self.protocols),
            "service_prefix": self.service_prefix,
            "record_size": self.record_size,
            "topology": self.topology.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any) -> SessionHeader:
        g = _Fields(d, "header")
        if g.get("format", str) != FORMAT_NAME:
            raise HairtraceError(f"bad session header: format is {d['format']!r}")
        record_size = g.get("record_size", int)
        if record_size < EVENT_SIZE:
            raise HairtraceError(
                f"bad session header: records of {record_size} bytes, expected {EVENT_SIZE}"
            )
        reasons = g.get("drop_reasons", dict)
        if not all(isinstance(v, str) and k.isascii() and k.isdigit() for k, v in reasons.items()):
            raise HairtraceError("bad session header: 'drop_reasons' is not number -> name")
        return cls(
            tool_version=g.get("tool_version", str),
            kernel=g.get("kernel", str),
            hostname=g.get("hostname", str),
            provider=g.get("provider", str),
            provider_reason=g.get("provider_reason", str),
            service_ip=g.get("service_ip", str),
            service_port=g.get("service_port", int),
            netns=g.get("netns", str),
            start_ns=g.get("start_ns", int),
            started_at=g.number("started_at", optional=True),
            topology=_topology(g.get("topology", dict), "header"),
            attached=tuple(g.strings("attached")),
            skipped=g.str_map("skipped"),
            attach_seconds=g.number("attach_seconds", optional=True),
            trace_attach_seconds=g.number("trace_attach_seconds", optional=True),
            command=tuple(g.strings("command")),
            drop_reasons={int(k): v for k, v in reasons.items()},
            record_size=record_size,
            netns_inode=g.get("netns_inode", int, optional=True),
            all_netns=bool(g.get("all_netns", bool, optional=True)),
            backend=g.get("backend", str, optional=True) or "core",
            backend_reason=g.get("backend_reason", str, optional=True) or "",
            compile_seconds=g.number("compile_seconds", optional=True),
            nf_priorities=g.int_map("nf_priorities"),
            format_minor=g.get("format_minor", int, optional=True) or 0,
            protocols=_protocols(g.get("protocols", list, optional=True)),
            service_prefix=_prefix(g.get("service_prefix", int, optional=True)),
        )


def _protocols(value: list[Any] | None) -> tuple[str, ...]:
    if value is None:
        return ("tcp",)
    if not value or not all(p in ("tcp", "udp") for p in value):
        raise HairtraceError(f"bad session header: 'protocols' is {value!r}, not tcp/udp")
    return tuple(value)


@dataclass(frozen=True)
class SessionFooter:
    """Everything known when recording ends. topology: the final snapshot, when re-taken.

    rule_drops: the DROP/REJECT rules whose counters rose, read in netns rule_drops_netns
    (optional in the file: older recordings have none). locations: drop location id ->
    "function+0xoff" (/proc/kallsyms of the recording machine; optional, from format 1.1).
    """

    end_ns: int  # CLOCK_MONOTONIC time the trace stopped
    events: int
    lost_events: int = 0
    lost_by_point: dict[str, int] = field(default_factory=dict)
    loss_windows: tuple[tuple[int, int], ...] = ()  # (first_ns, last_ns) where events were lost
    command_status: int | None = None
    topology: Topology | None = None
    rule_drops: tuple[RuleDrop, ...] = ()
    rule_drops_netns: int | None = None
    data_budget: int = 0  # (optional in the file: older recordings emitted every packet)
    over_budget_events: int = 0
    over_budget_by_point: dict[str, int] = field(default_factory=dict)
    locations: dict[int, str] = field(default_factory=dict)
    # sysctls seen to change while tracing (optional in the file: older recordings have none)
    sysctl_changes: tuple[SysctlChange, ...] = ()
    # the node's conntrack table (optional in the file: older recordings have none)
    conntrack: ConntrackStats | None = None
    # a rotating recording (--record-rotate): its segments, kept or deleted, and why
    # (tracer.session.rotate; optional in the file, absent when not rotating)
    recording: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "end_ns": self.end_ns,
            "events": self.events,
            "lost_events": self.lost_events,
            "lost_by_point": dict(self.lost_by_point),
            "loss_windows": [list(w) for w in self.loss_windows],
            "command_status": self.command_status,
            "topology": self.topology.to_dict() if self.topology else None,
            "rule_drops": [d.to_dict() for d in self.rule_drops],
            "rule_drops_netns": self.rule_drops_netns,
            "data_budget": self.data_budget,
            "over_budget_events": self.over_budget_events,
            "over_budget_by_point": dict(self.over_budget_by_point),
            "locations": {str(k): v for k, v in sorted(self.locations.items())},
            "sysctl_changes": [c.to_dict() for c in self.sysctl_changes],
            "conntrack": self.conntrack.to_dict() if self.conntrack is not None else None,
            **({"recording": self.recording} if self.recording is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> SessionFooter:
        g = _Fields(d, "footer")
        by_point = g.get("lost_by_point", dict)
        if not all(_is_int(v) for v in by_point.values()):
            raise HairtraceError("bad session footer: 'lost_by_point' is not point -> count")
        over_by_point = g.get("over_budget_by_point", dict, optional=True) or {}
        if not all(_is_int(v) for v in over_by_point.values()):
            raise HairtraceError("bad session footer: 'over_budget_by_point' is not point -> count")
        windows = g.get("loss_windows", list)
        if not all(isinstance(w, list) and len(w) == 2 and all(map(_is_int, w)) for w in windows):
            raise HairtraceError("bad session footer: 'loss_windows' is not [[first, last], ...]")
        topo = g.get("topology", dict, optional=True)
        locations = g.get("locations", dict, optional=True) or {}
        if not all(
            isinstance(v, str) and k.isascii() and k.isdigit() for k, v in locations.items()
        ):
            raise HairtraceError("bad session footer: 'locations' is not id -> function")
        try:
            rule_drops = tuple(
                map(RuleDrop.from_dict, g.get("rule_drops", list, optional=True) or [])
            )
        except (TypeError, ValueError) as e:
            raise HairtraceError(f"bad session footer: 'rule_drops': {e}") from None
        try:
            changes = tuple(
                map(SysctlChange.from_dict, g.get("sysctl_changes", list, optional=True) or [])
            )
        except (TypeError, ValueError) as e:
            raise HairtraceError(f"bad session footer: 'sysctl_changes': {e}") from None
        raw_ct = g.get("conntrack", dict, optional=True)
        try:
            conntrack = ConntrackStats.from_dict(raw_ct) if raw_ct is not None else None
        except (TypeError, ValueError) as e:
            raise HairtraceError(f"bad session footer: 'conntrack': {e}") from None
        return cls(
            end_ns=g.get("end_ns", int),
            events=g.get("events", int),
            lost_events=g.get("lost_events", int),
            lost_by_point=dict(by_point),
            loss_windows=tuple((w[0], w[1]) for w in windows),
            command_status=g.get("command_status", int, optional=True),
            topology=_topology(topo, "footer") if topo is not None else None,
            rule_drops=rule_drops,
            rule_drops_netns=g.get("rule_drops_netns", int, optional=True),
            data_budget=g.get("data_budget", int, optional=True) or 0,
            over_budget_events=g.get("over_budget_events", int, optional=True) or 0,
            over_budget_by_point=dict(over_by_point),
            locations={int(k): v for k, v in locations.items()},
            conntrack=conntrack,
            sysctl_changes=changes,
            recording=g.get("recording", dict, optional=True),
        )


def _topology(d: dict[str, Any], what: str) -> Topology:
    try:
        return Topology.from_dict(d)
    except OverflowError:  # a number too large for a float
        raise HairtraceError(f"bad session {what}: topology holds an out-of-range number") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
    """Typed access to the keys of one JSON object; a wrong one -> HairtraceError."""

    def __init__(self, d: Any, what: str) -> None:
        if not isinstance(d, Mapping):
            raise HairtraceError(f"bad session {what}: not a JSON object")
        self.d, self.what = d, what

    def _fail(self, key: str) -> HairtraceError:
        value = repr(self.d[key]) if key in self.d else "missing"
        return HairtraceError(f"bad session {self.what}: {key!r} is {value[:60]}")

    def get(self, key: str, typ: type, *, optional: bool = False) -> Any:
        v = self.d.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise self._fail(key)
        return v

    def number(self, key: str, *, optional: bool = False) -> float | None:
        v = self.d.get(key)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or abs(v) > 1e300:
            raise self._fail(key)
        return float(v)

    def strings(self, key: str) -> list[str]:
        v = self.get(key, list)
        if not all(isinstance(x, str) for x in v):
            raise self._fail(key)
        return v

    def int_map(self, key: str) -> dict[str, int]:
        """An optional name -> integer map ({} when absent)."""
        v = self.get(key, dict, optional=True) or {}
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v.values()):
            raise self._fail(key)
        return dict(v)

    def str_map(self, key: str) -> dict[str, str]:
        v = self.get(key, dict)
        if not all(isinstance(x, str) for x in v.values()):
            raise self._fail(key)
        return dict(v)


def _prefix(value: int | None) -> int:
    """The header's service_prefix: 32 when absent (recordings of one address)."""
    if value is None:
        return 32
    if not 1 <= value <= 32:
        raise HairtraceError(f"bad session header: service_prefix {value} is not 1-32")
    return value
