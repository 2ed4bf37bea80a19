"""Compare two traces of the same scenario: what changed between two reports.

Pure over report dicts (`hairtrace/report@1`, as `tracer.present.report.build`
makes them), e.g. the same scenario on two kernels, with two providers, or
broken against healthy. Used by `hairtrace diff` and `scripts/triage`.

How the two sides are lined up:

* connections by scenario role, never by port: client IP, Service ip:port and
  backend ip:port (the n-th such connection of A with the n-th of B); client
  ports differ between runs and are ignored everywhere;
* network namespaces by role too (the node netns the report names, the
  client's, the backend's), so a lab built under other names still lines up;
* packets by role (SYN, SYN+ACK, RST, ...; with the direction when a role goes
  both ways), the n-th of a role in A against the n-th in B. How many of a role
  each side has (retransmissions) is shown but is timing, not a difference.

What a path is compared as ("level"):

* same provider on both sides: the hops themselves (probe point, netns,
  device, NAT text, drop reason);
* different providers: provider-neutral stages both can see (device rx/tx in
  a netns, bridge forwarding, conntrack seen, NAT applied with its text, reset
  sent, drop with its reason); what only one provider can see (bridge
  functions, netfilter hook positions, br_netfilter entry) is left out, and
  conntrack/NAT count once per visit of a netns.

Either way, probe points one side skipped (`skipped_points`) are left out of
both, and a `kfree_skb` without a device after the packet was delivered (a
socket freeing its queue) is not a step of the path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

from tracer.errors import UsageError
from tracer.events.model import POINTS, service_label

REPORT_SCHEMA = "hairtrace/report@1"
DIFF_SCHEMA = "hairtrace/diff@1"

# probe point name -> provider-neutral kind (dev_rx, dev_tx, drop, reset, netfilter,
# bridge, bridge_nf, conntrack, nat), from the one table of points
POINT_KINDS: dict[str, str] = {info.name: info.kind for info in POINTS.values()}

# Stage kinds each known provider can observe (see tracer/kernel/providers.py).
# A provider not listed here is taken to see the kinds present in its report.
PROVIDER_STAGES: dict[str, frozenset[str]] = {
    "tracepoint": frozenset({"dev_rx", "dev_tx", "drop", "reset", "netfilter", "conntrack", "nat"}),
    "fentry": frozenset(
        {"dev_rx", "dev_tx", "drop", "reset", "bridge", "bridge_nf", "conntrack", "nat"}
    ),
    "kprobe": frozenset(
        {"dev_rx", "dev_tx", "drop", "reset", "bridge", "bridge_nf", "conntrack", "nat"}
    ),
}
_PASS_KINDS = frozenset({"conntrack", "nat", "netfilter", "bridge_nf"})
_TRANSLATION_KINDS = frozenset({"conntrack", "nat"})

ReportLoader = Callable[[str], dict[str, Any]]


# ----------------------------------------------------------------- data model


@dataclass(frozen=True)
class Stage:
    """One step of a packet's path, in the terms the comparison uses.

    kind: dev_rx, dev_tx, bridge, bridge_nf, netfilter, conntrack, nat, reset,
    drop or unknown. `detail` is the NAT text or the drop reason. `netns` is
    already translated to A's names (see `SideInfo`). src/dst are for display.
    """

    kind: str
    netns: str
    dev: str
    point: str
    detail: str = ""
    src: str = ""
    dst: str = ""
    direction: str = "original"

    def key(self, shared: bool) -> tuple[str, ...]:
        """What must be equal for two stages to count as the same step."""
        if not shared:
            return (self.point, self.netns, self.dev, self.detail)
        if self.kind in ("conntrack", "reset"):
            return (self.kind, self.netns)
        if self.kind in ("nat", "drop"):
            return (self.kind, self.netns, self.detail)
        if self.kind == "bridge":
            return (self.kind, self.netns, self.dev, self.point)
        return (self.kind, self.netns, self.dev)

    @property
    def where(self) -> str:
        return f"{self.netns}/{self.dev}" if self.dev else self.netns


@dataclass(frozen=True)
class SideInfo:
    """One of the two reports: what produced it and how its names were mapped."""

    label: str  # "A" or "B"
    name: str  # what the caller calls it (file name, run id), may be empty
    kernel: str
    provider: str
    service: str
    lost_events: int | None  # None: unknown (a recording without footer)
    skipped_points: tuple[str, ...]
    backend: str = "core"  # reports from before the bcc backend were CO-RE

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kernel": self.kernel,
            "provider": self.provider,
            "backend": self.backend,
            "service": self.service,
            "lost_events": self.lost_events,
            "skipped_points": list(self.skipped_points),
        }

    def describe(self) -> str:
        name = f" ({self.name})" if self.name else ""
        via = f" via {self.backend}" if self.backend != "core" else ""
        return f"{self.label} = {self.provider}{via} on {self.kernel}{name}"


@dataclass(frozen=True)
class Divergence:
    """The first place where the paths of one packet role part, and how."""

    index: int  # which packet of the role (0 = the first)
    netns: str
    dev: str
    a_steps: tuple[str, ...]  # steps only A takes there (described)
    b_steps: tuple[str, ...]
    sentence: str  # the whole thing, for people
    later: tuple[str, ...] = ()  # further differences of the same packet, further on

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "netns": self.netns,
            "dev": self.dev,
            "a_only": list(self.a_steps),
            "b_only": list(self.b_steps),
            "sentence": self.sentence,
            "later": list(self.later),
        }


@dataclass(frozen=True)
class PacketDiff:
    """One packet role of a connection on both sides."""

    role: str  # label: "SYN", "SYN+ACK", "ACK (reply)", ...
    count_a: int
    count_b: int
    divergence: Divergence | None = None
    differing: int = 0  # how many of the aligned packets of this role differ

    @property
    def only_in(self) -> str | None:
        if self.count_a and not self.count_b:
            return "A"
        if self.count_b and not self.count_a:
            return "B"
        return None

    @property
    def same(self) -> bool:
        return self.only_in is None and self.divergence is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "count_a": self.count_a,
            "count_b": self.count_b,
            "only_in": self.only_in,
            "same": self.same,
            "differing": self.differing,
            "divergence": self.divergence.to_dict() if self.divergence else None,
        }


@dataclass(frozen=True)
class ConnectionDiff:
    """One connection (by scenario role) on both sides."""

    client: str  # client IP (ports never matter)
    service: str  # ip:port
    backend: str | None
    verdict_a: str | None  # None: no such connection on that side
    verdict_b: str | None
    cause_a: str | None = None
    cause_b: str | None = None
    break_a: str | None = None  # where the break is, "SYN+ACK in node/cni0 (point)"
    break_b: str | None = None
    packets: tuple[PacketDiff, ...] = ()

    @property
    def only_in(self) -> str | None:
        if self.verdict_b is None:
            return "A"
        if self.verdict_a is None:
            return "B"
        return None

    @property
    def equivalent(self) -> bool:
        return (
            self.only_in is None
            and self.verdict_a == self.verdict_b
            and self.cause_a == self.cause_b
            and all(p.same for p in self.packets)
        )

    @property
    def title(self) -> str:
        backend = f" (backend {self.backend})" if self.backend else ""
        return f"{self.client} -> {self.service}{backend}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "service": self.service,
            "backend": self.backend,
            "only_in": self.only_in,
            "equivalent": self.equivalent,
            "verdict": {"a": self.verdict_a, "b": self.verdict_b},
            "cause": {"a": self.cause_a, "b": self.cause_b},
            "break": {"a": self.break_a, "b": self.break_b},
            "packets": [p.to_dict() for p in self.packets],
        }


@dataclass(frozen=True)
class DiffResult:
    """Everything `hairtrace diff` says about two reports."""

    a: SideInfo
    b: SideInfo
    level: str  # "hops (tracepoint on both)" | "shared stages (tracepoint vs fentry)"
    shared: bool  # compared at provider-neutral stages
    compared_kinds: tuple[str, ...]  # stage kinds on the paths compared
    left_out_kinds: tuple[str, ...]  # kinds only one provider sees, left out
    netns_roles: tuple[tuple[str, str, str], ...]  # (role, A's name, B's name) when they differ
    ignored_points: tuple[str, ...]  # skipped by one side, left out of both
    connections: tuple[ConnectionDiff, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def equivalent(self) -> bool:
        """Same verdicts, causes and paths (at `level`) for every connection."""
        return all(c.equivalent for c in self.connections)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": DIFF_SCHEMA,
            "equivalent": self.equivalent,
            "level": self.level,
            "shared": self.shared,
            "compared_kinds": list(self.compared_kinds),
            "left_out_kinds": list(self.left_out_kinds),
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "netns_roles": [{"role": r, "a": na, "b": nb} for r, na, nb in self.netns_roles],
            "ignored_points": list(self.ignored_points),
            "notes": list(self.notes),
            "connections": [c.to_dict() for c in self.connections],
        }


# ------------------------------------------------------------------ reading in


def parse_reports(text: str, what: str = "input") -> list[dict[str, Any]]:
    """Every JSON report in `text` (one, or several concatenated as vm-run prints them)."""
    dec, i, docs = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        try:
            doc, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{what}: not JSON at line {exc.lineno}: {exc.msg}") from exc
        check_report(doc, what)
        docs.append(doc)
    if not docs:
        raise UsageError(f"{what}: no report in it (empty)")
    return docs


def check_report(doc: object, what: str) -> None:
    """Raise UsageError unless `doc` is a hairtrace/report@1 dict."""
    if not isinstance(doc, dict):
        raise UsageError(f"{what}: not a hairtrace report (a JSON {type(doc).__name__})")
    schema = doc.get("schema")
    if schema != REPORT_SCHEMA:
        raise UsageError(f"{what}: not a {REPORT_SCHEMA} report (schema {schema!r})")
    if not isinstance(doc.get("connections"), list):
        raise UsageError(f"{what}: report without a connections list")


def diff_sources(
    a: str, b: str, load: ReportLoader, names: tuple[str, str] | None = None
) -> DiffResult:
    """diff_reports over whatever `load` turns a and b into (files, sessions: the caller's IO)."""
    return diff_reports(load(a), load(b), names=names or (a, b))


# ------------------------------------------------------------------ alignment


def _client_port_free(endpoint: str, client: str) -> str:
    """'ip:port' with the client's port dropped (client ports never matter)."""
    host, _, _port = endpoint.rpartition(":")
    return host if host == client else endpoint


def _netns_roles(report: dict[str, Any]) -> dict[str, str]:
    """role -> netns name: node (the report's), client and backend (from the first packets)."""
    roles: dict[str, str] = {}
    node = report.get("netns")
    if isinstance(node, str) and node:
        roles["node"] = node
    for conn in report["connections"]:
        for pkt in conn.get("packets", []):
            hops = pkt.get("hops") or []
            if not hops:
                continue
            role = "client" if pkt.get("direction") == "original" else "backend"
            roles.setdefault(role, hops[0]["netns"])
        if "client" in roles and "backend" in roles:
            break
    return roles


def _rename_map(ra: dict[str, str], rb: dict[str, str]) -> dict[str, str]:
    """B's netns name -> A's, for roles whose names differ."""
    out: dict[str, str] = {}
    for role, name_b in rb.items():
        name_a = ra.get(role)
        if name_a and name_a != name_b and name_b not in out:
            out[name_b] = name_a
    return out


def _conn_key(conn: dict[str, Any]) -> tuple[str, str, str | None, str]:
    """(client ip, service, backend, proto): a UDP flow never pairs with a TCP connection
    (reports from before UDP was traced have no "proto": TCP)."""
    svc = conn["service"]
    be = conn.get("backend")
    return (
        conn["client"]["ip"],
        f"{svc['ip']}:{svc['port']}",
        f"{be['ip']}:{be['port']}" if be else None,
        conn.get("proto", "tcp"),
    )


def _align_connections(
    ca: list[dict[str, Any]], cb: list[dict[str, Any]]
) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Pairs by (client ip, service, backend, proto), n-th with n-th; then by (client,
    service, proto)."""
    pairs: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = []
    left_b = list(cb)
    unmatched_a: list[dict[str, Any]] = []
    for conn in ca:
        match = next((c for c in left_b if _conn_key(c) == _conn_key(conn)), None)
        if match is None:
            unmatched_a.append(conn)
            continue
        left_b.remove(match)
        pairs.append((conn, match))
    for conn in unmatched_a:
        want = _conn_key(conn)
        match = next((c for c in left_b if (k := _conn_key(c))[:2] == want[:2]
                      and k[3] == want[3]), None)  # fmt: skip
        if match is not None:
            left_b.remove(match)
        pairs.append((conn, match))
    pairs.extend((None, c) for c in left_b)
    return pairs


# ---------------------------------------------------------------------- paths


def _stage_of(hop: dict[str, Any], direction: str, rename: dict[str, str]) -> Stage:
    point = str(hop.get("point", ""))
    kind = POINT_KINDS.get(point, "unknown")
    nat = hop.get("nat") or ""
    if kind == "netfilter":
        if nat:
            kind = "nat"
        elif point.endswith("@conntrack"):
            kind = "conntrack"
    detail = nat or str(hop.get("drop_reason") or "")
    netns = str(hop.get("netns", ""))
    return Stage(
        kind=kind,
        netns=rename.get(netns, netns),
        dev=str(hop.get("dev") or ""),
        point=point,
        detail=detail,
        src=str(hop.get("src", "")),
        dst=str(hop.get("dst", "")),
        direction=direction,
    )


def _path(
    pkt: dict[str, Any],
    rename: dict[str, str],
    ignored: frozenset[str],
    kinds: frozenset[str] | None,
) -> list[Stage]:
    """The packet's steps: all hops (kinds None) or the shared stages of `kinds`."""
    direction = str(pkt.get("direction", "original"))
    stages = [
        _stage_of(h, direction, rename)
        for h in pkt.get("hops", [])
        if h.get("point") not in ignored
    ]
    last_rx = max((i for i, s in enumerate(stages) if s.kind == "dev_rx"), default=-1)
    stages = [
        s for i, s in enumerate(stages) if not (s.kind == "drop" and not s.dev and i > last_rx)
    ]
    if kinds is None:
        return stages
    out: list[Stage] = []
    seen: set[tuple[str, ...]] = set()  # conntrack/NAT once per visit of a netns
    for s in stages:
        if s.kind not in kinds or (s.kind == "nat" and not s.detail):
            continue  # a NAT point without a translation says nothing both providers see
        if out and s.netns != out[-1].netns:
            seen = set()
        if s.kind in _TRANSLATION_KINDS:
            k = s.key(True)
            if k in seen:
                continue
            seen.add(k)
        out.append(s)
    return out


def _packet_groups(conn: dict[str, Any] | None) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for pkt in (conn or {}).get("packets", []):
        groups.setdefault((pkt["role"], pkt.get("direction", "original")), []).append(pkt)
    return groups


# ------------------------------------------------------------------- describing


def _hook_name(point: str) -> str:
    # "nf:FORWARD@filter" -> "FORWARD"
    return point.removeprefix("nf:").split("@", 1)[0]


def _pass_item(s: Stage) -> str:
    if s.kind == "conntrack":
        return f"conntrack ({s.point})"
    if s.kind == "nat":
        what = "reverse NAT" if s.direction == "reply" else "NAT"
        return f"{what} ({s.detail})"
    if s.kind == "netfilter":
        return f"netfilter {_hook_name(s.point)} ({s.point})"
    return f"br_netfilter ({s.point})"


def _verb(s: Stage) -> str:
    if s.kind == "dev_rx":
        return f"is received on {s.where} ({s.point})"
    if s.kind == "dev_tx":
        return f"is sent out of {s.where} ({s.point})"
    if s.kind == "bridge":
        if s.point == "br_forward":
            return f"is bridged (br_forward) to {s.where}"
        if s.point == "br_pass_frame_up":
            return f"is passed up by the bridge from {s.where} (br_pass_frame_up)"
        if s.point == "br_dev_xmit":
            return f"is sent into bridge {s.dev or '?'} in {s.netns} (br_dev_xmit)"
        return f"enters the bridge at {s.where} ({s.point})"
    if s.kind == "reset":
        return f"makes {s.netns} send a RST ({s.point})"
    if s.kind == "drop":
        return f"is dropped in {s.where} ({s.detail or 'no reason'}, {s.point})"
    return f"reaches {s.point} at {s.where}"


def _place(group: Sequence[Stage]) -> str:
    devs = {s.dev for s in group}
    if len(devs) == 1 and group[0].dev:
        return f"at {group[0].where}"
    return f"in {group[0].netns}"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe_steps(stages: Sequence[Stage]) -> list[str]:
    """Phrases a network engineer reads at once ("passes conntrack (...) at node/cni0")."""
    out: list[str] = []
    i = 0
    while i < len(stages):
        s = stages[i]
        if s.kind in _PASS_KINDS:
            j = i
            while j < len(stages) and stages[j].kind in _PASS_KINDS:
                if stages[j].netns != s.netns:
                    break
                j += 1
            group = stages[i:j]
            out.append(f"passes {_join([_pass_item(g) for g in group])} {_place(group)}")
            i = j
        else:
            out.append(_verb(s))
            i += 1
    return out


def _only(seg: Sequence[Stage], other: Sequence[Stage], shared: bool) -> list[Stage]:
    """The stages of seg that other lacks (as a multiset of keys), in seg's order."""
    left = [o.key(shared) for o in other]
    out = []
    for s in seg:
        k = s.key(shared)
        if k in left:
            left.remove(k)
        else:
            out.append(s)
    return out


def _side_clause(
    label: str,
    only: list[Stage],
    seg: Sequence[Stage],
    other_only: list[Stage],
    prev: Stage | None,
    nxt: Stage | None,
) -> str:
    if only:
        return f"{label} " + ", then ".join(describe_steps(only))
    skipped = {s.kind for s in other_only} & _TRANSLATION_KINDS
    without = " without conntrack or NAT" if skipped else ""
    if not seg:
        if prev and nxt:
            return f"{label} goes straight from {_landmark(prev)} to {_landmark(nxt)}{without}"
        if prev:
            return f"{label} goes no further than {_landmark(prev)}"
        if nxt:
            return f"{label} starts at {_landmark(nxt)}"
        return f"{label} has no such step"
    bridged = [s for s in seg if s.kind == "bridge" and s.point == "br_forward"]
    if bridged:
        return f"{label} is only bridged (br_forward) to {bridged[-1].where}{without}"
    return f"{label} has no such step{without}"


def _landmark(s: Stage) -> str:
    """A stage named as a place on the path ("node/cni0", "NAT (DNAT a -> b) in node")."""
    if s.kind in _PASS_KINDS:
        return f"{_pass_item(s)} in {s.netns}"
    return s.where


def _peer(s: Stage, client: str) -> str:
    return f"{_client_port_free(s.src, client)} -> {_client_port_free(s.dst, client)}"


def _delivery(pa: Sequence[Stage], pb: Sequence[Stage], client: str) -> str:
    """How each side's packet arrives at its last receiving device, when that differs."""
    ra = [s for s in pa if s.kind == "dev_rx"]
    rb = [s for s in pb if s.kind == "dev_rx"]
    if not ra or not rb:
        return ""
    la, lb = ra[-1], rb[-1]
    if la.where == lb.where and _peer(la, client) != _peer(lb, client):
        return f"A reaches {la.where} as {_peer(la, client)}, B as {_peer(lb, client)}"
    return ""


def _divergence(
    label: str,
    index: int,
    pa: list[Stage],
    pb: list[Stage],
    shared: bool,
    client: str,
) -> Divergence | None:
    ka = [s.key(shared) for s in pa]
    kb = [s.key(shared) for s in pb]
    if ka == kb:
        return None
    ops = SequenceMatcher(None, ka, kb, autojunk=False).get_opcodes()
    first = next(k for k, op in enumerate(ops) if op[0] != "equal")
    _tag, i1, i2, j1, j2 = ops[first]
    start = (pa[i1:i2] or pb[j1:j2])[0]
    netns = start.netns
    # take in further differences while they (and what lies between) stay in this netns
    last = first
    for k in range(first + 1, len(ops)):
        tag, x1, x2, y1, y2 = ops[k]
        if any(s.netns != netns for s in pa[x1:x2] + pb[y1:y2]):
            break
        if tag != "equal":
            last = k
    i2, j2 = ops[last][2], ops[last][4]
    seg_a, seg_b = pa[i1:i2], pb[j1:j2]
    only_a, only_b = _only(seg_a, seg_b, shared), _only(seg_b, seg_a, shared)
    prev = pa[i1 - 1] if i1 > 0 else None
    nxt = pa[i2] if i2 < len(pa) else (pb[j2] if j2 < len(pb) else None)
    head = f"{label} #{index + 1}" if index else label
    if not only_a and not only_b:
        order_a = ", ".join(f"{s.point}@{s.dev or s.netns}" for s in seg_a)
        order_b = ", ".join(f"{s.point}@{s.dev or s.netns}" for s in seg_b)
        sentence = (
            f"{head}: A and B take the same steps in {netns} in another order "
            f"(A: {order_a}; B: {order_b})"
        )
    else:
        sentence = (
            f"{head}: {_side_clause('A', only_a, seg_a, only_b, prev, nxt)}; "
            f"{_side_clause('B', only_b, seg_b, only_a, prev, nxt)}"
        )
    delivery = _delivery(pa, pb, client)
    if delivery:
        sentence += f"; {delivery}"
    later = []
    for tag, x1, x2, y1, y2 in ops[last + 1 :]:
        if tag == "equal":
            continue
        la, lb = _only(pa[x1:x2], pb[y1:y2], shared), _only(pb[y1:y2], pa[x1:x2], shared)
        parts = []
        if la:
            parts.append("only A " + ", then ".join(describe_steps(la)))
        if lb:
            parts.append("only B " + ", then ".join(describe_steps(lb)))
        later.append("; ".join(parts) or "same steps in another order")
    where = (only_a or only_b or seg_a or seg_b or [start])[0]
    return Divergence(
        index=index,
        netns=where.netns,
        dev=where.dev,
        a_steps=tuple(describe_steps(only_a)),
        b_steps=tuple(describe_steps(only_b)),
        sentence=sentence,
        later=tuple(later),
    )


def _role_label(role: str, direction: str, both_ways: set[str]) -> str:
    return f"{role} ({direction})" if role in both_ways else role


def _packets_diff(
    ca: dict[str, Any] | None,
    cb: dict[str, Any] | None,
    paths: _PathMaker,
    client: str,
) -> tuple[PacketDiff, ...]:
    ga, gb = _packet_groups(ca), _packet_groups(cb)
    order = list(ga) + [k for k in gb if k not in ga]
    directions: dict[str, set[str]] = {}
    for role, direction in order:
        directions.setdefault(role, set()).add(direction)
    both_ways = {r for r, d in directions.items() if len(d) > 1}
    out = []
    for role, direction in order:
        la, lb = ga.get((role, direction), []), gb.get((role, direction), [])
        label = _role_label(role, direction, both_ways)
        first: Divergence | None = None
        differing = 0
        for n, (pa, pb) in enumerate(zip(la, lb, strict=False)):
            d = _divergence(label, n, paths.a(pa), paths.b(pb), paths.shared, client)
            if d is not None:
                differing += 1
                first = first or d
        out.append(PacketDiff(label, len(la), len(lb), first, differing))
    return tuple(out)


@dataclass(frozen=True)
class _PathMaker:
    """Turns packets of A or B into comparable paths at the chosen level."""

    rename_b: dict[str, str]
    ignored: frozenset[str]
    kinds: frozenset[str] | None  # None: hop level

    @property
    def shared(self) -> bool:
        return self.kinds is not None

    def a(self, pkt: dict[str, Any]) -> list[Stage]:
        return _path(pkt, {}, self.ignored, self.kinds)

    def b(self, pkt: dict[str, Any]) -> list[Stage]:
        return _path(pkt, self.rename_b, self.ignored, self.kinds)


# ---------------------------------------------------------------------- the API


def _stage_kinds_seen(report: dict[str, Any]) -> frozenset[str]:
    kinds = set()
    for conn in report["connections"]:
        for pkt in conn.get("packets", []):
            for hop in pkt.get("hops", []):
                kinds.add(_stage_of(hop, "original", {}).kind)
    return frozenset(kinds)


def _observes(report: dict[str, Any]) -> frozenset[str]:
    return PROVIDER_STAGES.get(str(report.get("provider")), _stage_kinds_seen(report))


def _side(label: str, name: str, report: dict[str, Any]) -> SideInfo:
    svc = report.get("service") or {}
    return SideInfo(
        label=label,
        name=name,
        kernel=str(report.get("kernel", "?")),
        provider=str(report.get("provider", "?")),
        service=service_label(str(svc.get("ip", "?")), int(svc.get("port") or 0)),
        lost_events=None if report.get("lost_events") is None else int(report["lost_events"]),
        skipped_points=tuple(sorted(report.get("skipped_points") or {})),
        backend=str(report.get("backend", "core")),
    )


def _break_where(conn: dict[str, Any] | None) -> tuple[str | None, str | None]:
    brk = (conn or {}).get("break")
    if not brk:
        return None, None
    where = f"{brk.get('netns')}/{brk.get('dev')}" if brk.get("dev") else brk.get("netns")
    return brk.get("cause"), f"{brk.get('packet_role')} in {where} ({brk.get('point')})"


_STAGE_ORDER = ("dev_rx", "dev_tx", "bridge", "bridge_nf", "netfilter", "conntrack", "nat")


def _sorted_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    rank = {k: i for i, k in enumerate(_STAGE_ORDER)}
    return tuple(sorted(kinds, key=lambda k: (rank.get(k, len(rank)), k)))


def diff_reports(
    a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] | None = None
) -> DiffResult:
    """Compare report a with report b (same scenario); see the module docstring."""
    check_report(a, "A")
    check_report(b, "B")
    side_a, side_b = _side("A", (names or ("", ""))[0], a), _side("B", (names or ("", ""))[1], b)
    roles_a, roles_b = _netns_roles(a), _netns_roles(b)
    rename_b = _rename_map(roles_a, roles_b)
    netns_roles = tuple(
        (role, roles_a[role], roles_b[role])
        for role in ("node", "client", "backend")
        if role in roles_a and role in roles_b and roles_a[role] != roles_b[role]
    )
    ignored = frozenset(side_a.skipped_points) ^ frozenset(side_b.skipped_points)
    if side_a.provider == side_b.provider:
        kinds: frozenset[str] | None = None
        level = f"hops ({side_a.provider} on both)"
        compared = _stage_kinds_seen(a) | _stage_kinds_seen(b)
        left_out: frozenset[str] = frozenset()
    else:
        obs_a, obs_b = _observes(a), _observes(b)
        kinds = obs_a & obs_b
        level = f"shared stages ({side_a.provider} vs {side_b.provider})"
        compared, left_out = kinds, obs_a ^ obs_b
    paths = _PathMaker(rename_b, ignored, kinds)

    notes = []
    if side_a.service != side_b.service:
        notes.append(f"the reports trace different services: {side_a.service} vs {side_b.service}")
    for side in (side_a, side_b):
        if side.lost_events is None:
            notes.append(f"{side.label}'s event losses are unknown (recording without footer)")
        elif side.lost_events:
            notes.append(f"{side.label} lost {side.lost_events} events: its paths may miss hops")
    conns = []
    for ca, cb in _align_connections(a["connections"], b["connections"]):
        base = ca or cb
        assert base is not None
        client, service, backend, _proto = _conn_key(base)
        cause_a, where_a = _break_where(ca)
        cause_b, where_b = _break_where(cb)
        conns.append(
            ConnectionDiff(
                client=client,
                service=service,
                backend=backend,
                verdict_a=ca["verdict"] if ca else None,
                verdict_b=cb["verdict"] if cb else None,
                cause_a=cause_a,
                cause_b=cause_b,
                break_a=where_a,
                break_b=where_b,
                packets=_packets_diff(ca, cb, paths, client) if ca and cb else (),
            )
        )
    return DiffResult(
        a=side_a,
        b=side_b,
        level=level,
        shared=kinds is not None,
        compared_kinds=_sorted_kinds(compared),
        left_out_kinds=_sorted_kinds(left_out),
        netns_roles=netns_roles,
        ignored_points=tuple(sorted(ignored)),
        connections=tuple(conns),
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------ text


def _verdict_line(c: ConnectionDiff) -> str:
    if c.only_in:
        side = "A" if c.only_in == "A" else "B"
        verdict = c.verdict_a if side == "A" else c.verdict_b
        cause = c.cause_a if side == "A" else c.cause_b
        return f"only in {side}: {verdict}" + (f", cause {cause}" if cause else "")
    if c.verdict_a == c.verdict_b:
        line = f"{c.verdict_a} in both"
    else:
        line = f"verdict {c.verdict_a} -> {c.verdict_b}"
    if c.cause_a == c.cause_b:
        if c.cause_a:
            line += f", cause {c.cause_a}"
    else:
        line += f"; cause {c.cause_a or 'none'} -> {c.cause_b or 'none'}"
    return line


def render_text(result: DiffResult) -> str:
    """The diff for people: one paragraph per connection, divergences as sentences."""
    lines = [
        f"{result.a.describe()}",
        f"{result.b.describe()}",
        f"compared at: {result.level}",
    ]
    if result.shared and result.left_out_kinds:
        lines.append(
            "  (left out, seen by one provider only: " + ", ".join(result.left_out_kinds) + ")"
        )
    for role, na, nb in result.netns_roles:
        lines.append(f"netns matched by role: {role} = {na} in A, {nb} in B (shown as {na})")
    if result.ignored_points:
        lines.append(
            "points one side skipped, left out of both: " + ", ".join(result.ignored_points)
        )
    lines.extend(f"note: {n}" for n in result.notes)
    count = sum(not c.equivalent for c in result.connections)
    lines.append(
        "result: equivalent"
        if result.equivalent
        else f"result: different ({count} of {len(result.connections)} connections)"
    )
    for c in result.connections:
        lines.append("")
        lines.append(f"connection {c.title}: {_verdict_line(c)}")
        if c.break_a != c.break_b and c.break_a and c.break_b:
            lines.append(f"  break: A at {c.break_a}; B at {c.break_b}")
        same = [p.role for p in c.packets if p.same]
        counts = [
            f"{p.role} {p.count_a} in A, {p.count_b} in B"
            for p in c.packets
            if p.count_a != p.count_b and not p.only_in
        ]
        told: dict[str, str] = {}  # what a divergence says (without its role) -> first role
        for p in c.packets:
            if not p.divergence:
                continue
            d = p.divergence
            what = d.sentence.split(": ", 1)[1] + "|" + "|".join(d.later)
            if what in told and d.index == 0:
                lines.append(f"  {p.role}: the same difference as {told[what]}")
                continue
            told.setdefault(what, p.role)
            lines.append(f"  {d.sentence}")
            lines.extend(f"    then: {t}" for t in d.later)
            if p.differing > 1:
                lines.append(f"    ({p.differing} aligned {p.role} packets differ)")
        for side in ("A", "B"):
            only = [f"{p.role} x{p.count_a or p.count_b}" for p in c.packets if p.only_in == side]
            if only:
                lines.append(f"  only in {side}: " + ", ".join(only))
        if same:
            lines.append("  same path: " + ", ".join(same))
        if counts:
            lines.append("  packet counts (timing, not compared): " + "; ".join(counts))
    return "\n".join(lines) + "\n"
