"""The JSON report (schema hairtrace/report@1): a contract other tools read.

Fields named in the schema are never renamed; new ones may be added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracer.analysis.context import ConntrackStats, RuleDrop, SysctlChange
from tracer.analysis.diagnose import Break, Diagnosis, Exchange
from tracer.analysis.reassemble import Connection, Hop, Packet
from tracer.events.model import icmp_name
from tracer.present.services import ServiceKey, ServiceTally

SCHEMA = "hairtrace/report@1"


@dataclass(frozen=True)
class RunInfo:
    """How and when the report was produced (the fields a replay may change)."""

    tool_version: str
    kernel: str
    provider: str
    provider_reason: str
    service_ip: str
    service_port: int
    netns: str
    events: int = 0
    protocols: tuple[str, ...] = ("tcp",)  # of the service traced (ICMP errors follow them)
    # None when not known (lost_events_unknown says why: a recording without the footer
    # that holds these counters): unknown is never reported as 0
    lost_events: int | None = 0
    lost_by_point: dict[str, int] | None = field(default_factory=dict)
    # TCP packets without SYN/FIN/RST emitted per tuple, point and device (0 = all), and
    # the matched events not emitted past that budget, per point (None: unknown, as above)
    data_budget: int | None = 0
    over_budget_events: int | None = 0
    over_budget_by_point: dict[str, int] | None = field(default_factory=dict)
    lost_events_unknown: str | None = None  # why the counts above are None; None: known
    attached: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)  # probe point -> why not attached
    attach_seconds: float | None = None  # process start -> every probe attached
    trace_attach_seconds: float | None = None  # this trace's start -> attached
    started_at: float | None = None  # wall clock
    start_ns: int = 0  # monotonic origin of packet timestamps
    command: tuple[str, ...] = ()
    command_status: int | None = None
    scope: tuple[str, ...] | None = None  # names of the namespaces analysed; None = all
    events_out_of_scope: int = 0  # events of namespaces outside the node (other labs)
    # DROP/REJECT rules of netns that dropped packets; None: unknown (no session footer)
    rule_drops: tuple[RuleDrop, ...] | None = ()
    conntrack: ConntrackStats | None = None  # the node's conntrack table; None: unknown
    backend: str = "core"  # core (libbpf CO-RE) | bcc
    backend_reason: str = ""
    compile_seconds: float | None = None  # bcc: compiling the BPF source at start-up
    # the traced address's ports in the node's kube-proxy rules ("80/tcp"); None: unknown
    service_ports: tuple[str, ...] | None = None
    # the Service's name ("ns/name") and port name in those rules; None: not known
    service_name: str | None = None
    service_port_name: str | None = None
    # (ip, port, proto) the Service's rules DNAT to; None: unknown (no kube-proxy rules)
    service_endpoints: tuple[tuple[str, int, str], ...] | None = None
    warnings: tuple[str, ...] = ()  # said at start and in the summary (e.g. no such Service)
    nf_priorities: dict[str, int] = field(default_factory=dict)  # netfilter program -> prio
    # the traced netns's sysctls seen to change while tracing (analysis.context.SysctlChange)
    sysctl_changes: tuple[SysctlChange, ...] = ()
    # a range of Service addresses (--svc CIDR): service_ip/service_prefix; 32: one address
    service_prefix: int = 32
    # (ip, port, proto) -> "ns/name" of the traced Services in the node's kube-proxy rules
    service_names: Mapping[ServiceKey, str] = field(default_factory=dict)
    # --record-rotate: the recording's segments at the end (kept, deleted, and why)
    recording: Mapping[str, Any] | None = None


def _since(ts_ns: int, start_ns: int) -> float:
    """Seconds since the trace started, as packet times are given."""
    return round((ts_ns - start_ns) / 1e9, 6)


def _endpoint(ip: str, port: int) -> dict[str, Any]:
    return {"ip": ip, "port": port}


def _pod_endpoint(ip: str, port: int, pod: str | None) -> dict[str, Any]:
    """A client or backend: its address and the pod holding it (None: not known)."""
    return {"ip": ip, "port": port, "pod": pod}


def _hop(h: Hop) -> dict[str, Any]:
    out: dict[str, Any] = {
        "netns": h.netns_name,
        "pod": h.pod,
        "dev": h.dev,
        "dev_pod": h.dev_pod,
        "point": h.point,
        "src": f"{h.tuple.src}:{h.tuple.sport}",
        "dst": f"{h.tuple.dst}:{h.tuple.dport}",
        "ct": h.ct.to_dict() if h.ct else None,
        "nat": h.nat,
    }
    if h.drop_reason:
        out["drop_reason"] = h.drop_reason
    return out


def _packet(p: Packet, origin_ns: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "role": p.role,
        "direction": p.direction,
        "ts": round((p.ts_ns - origin_ns) / 1e9, 6),
        "seq": p.seq,
        "ack": p.ack_seq,
        "hops": [_hop(h) for h in p.hops],
    }
    if p.caused_by is not None:
        out["caused_by"] = p.caused_by
    if p.length is not None:
        out["length"] = p.length
    if p.icmp is not None:
        out["icmp"] = {"type": p.icmp[0], "code": p.icmp[1], "name": icmp_name(*p.icmp),
                       "from": p.icmp_from}  # fmt: skip
    return out


def _exchange(x: Exchange) -> dict[str, Any]:
    return {"request": x.request, "reply": x.reply, "icmp": x.icmp, "ok": x.ok,
            "pending": x.pending}  # fmt: skip


def break_dict(b: Break | None) -> dict[str, Any] | None:
    if b is None:
        return None
    return {
        "packet_role": b.packet_role,
        "packet_index": b.packet_index,
        "netns": b.netns,
        "dev": b.dev,
        "point": b.point,
        "cause": b.cause,
        "explanation": b.explanation,
        "evidence": list(b.evidence),
        "fix": b.fix,
        "via": list(b.via),
        "hook": b.hook,
        "rule": b.rule,
        "drop_reason": b.drop_reason,
    }


def connection_dict(
    c: Connection,
    d: Diagnosis,
    origin_ns: int,
    *,
    packets: Any = None,
    names: Mapping[ServiceKey, str] | None = None,
) -> dict[str, Any]:
    """One entry of "connections"; packets: what to put as "packets" instead of c's
    (tracer.present.columnar writes them itself); names: RunInfo.service_names (the
    Service's name, null when not known)."""
    name = (names or {}).get((c.key.dst, c.key.dport, c.proto))
    return {
        "client": _pod_endpoint(c.key.src, c.key.sport, c.client_pod),
        "service": {**_endpoint(c.key.dst, c.key.dport), "name": name},
        "backend": _pod_endpoint(*c.backend, c.backend_pod) if c.backend else None,
        "verdict": d.verdict,
        "notes": list(d.notes),
        "packets": [_packet(p, origin_ns) for p in c.packets] if packets is None else packets,
        "break": break_dict(d.brk),
        "isn": c.isn,
        "first_seen_mid_connection": c.first_seen_mid_connection,
        "proto": c.proto,
        "exchanges": [_exchange(x) for x in d.exchanges],
    }


def head_fields(run: RunInfo) -> dict[str, Any]:
    """The report's fields known once every probe is attached (before any connection):
    they come first, so that a live trace can write its connections as it judges them."""
    return {
        "schema": SCHEMA,
        "tool_version": run.tool_version,
        "kernel": run.kernel,
        "provider": run.provider,
        "provider_reason": run.provider_reason,
        "backend": run.backend,
        "backend_reason": run.backend_reason,
        "compile_seconds": run.compile_seconds,
        "service": {
            **_endpoint(run.service_ip, run.service_port),
            "ports_in_rules": None if run.service_ports is None else list(run.service_ports),
            "protocols": list(run.protocols),
            "name": run.service_name,
            "port_name": run.service_port_name,
            "prefix_len": run.service_prefix,
            "endpoints_in_rules": None
            if run.service_endpoints is None
            else [
                {"ip": ip, "port": port, "proto": proto}
                for ip, port, proto in run.service_endpoints
            ],
        },
        "warnings": list(run.warnings),
        "netns": run.netns,
        "attached": list(run.attached),
        "netfilter_priorities": run.nf_priorities,
        "skipped_points": run.skipped,
        "attach_seconds": run.attach_seconds,
        "trace_attach_seconds": run.trace_attach_seconds,
        "started_at": run.started_at,
        "command": list(run.command),
    }


def tail_fields(run: RunInfo, services: ServiceTally | None = None) -> dict[str, Any]:
    """The report's fields known when the trace ends: after the connections (services:
    their tally per Service)."""
    return {
        "services": (services or ServiceTally()).rows(run.service_names),
        "events": run.events,
        "lost_events": run.lost_events,
        "lost_by_point": run.lost_by_point,
        "lost_events_unknown": run.lost_events_unknown,
        "data_budget": run.data_budget,
        "over_budget_events": run.over_budget_events,
        "over_budget_by_point": run.over_budget_by_point,
        "command_status": run.command_status,
        "recording": dict(run.recording) if run.recording is not None else None,
        "scope": list(run.scope) if run.scope is not None else None,
        "events_out_of_scope": run.events_out_of_scope,
        "rule_drops": None
        if run.rule_drops is None
        else [{"netns": run.netns, **d.to_dict()} for d in run.rule_drops],
        "conntrack": run.conntrack.to_dict() if run.conntrack is not None else None,
        "sysctl_changes": [
            {
                "netns": run.netns,
                "key": c.key,
                "before": c.before,
                "value": c.value,
                "between": [_since(c.after_ns, run.start_ns), _since(c.by_ns, run.start_ns)],
            }
            for c in run.sysctl_changes
        ],
    }


def build(run: RunInfo, results: list[tuple[Connection, Diagnosis]]) -> dict[str, Any]:
    """The whole report as plain data, ready for json.dumps: the head fields, the
    connections in the order they were judged, the tail fields."""
    tally = ServiceTally()
    for c, d in results:
        tally.add(c, d)
    names = run.service_names
    return {
        **head_fields(run),
        "connections": [connection_dict(c, d, run.start_ns, names=names) for c, d in results],
        **tail_fields(run, tally),
    }


def exit_status(results: list[tuple[Connection, Diagnosis]]) -> int:
    """0 when every traced connection is ok, 3 when any is broken."""
    return 3 if any(d.verdict == "broken" for _c, d in results) else 0
