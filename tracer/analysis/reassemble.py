"""Events -> packets -> connections, linked through conntrack tuples.

A packet is one TCP segment, UDP datagram or ICMP error followed across points,
devices and namespaces (same flags, sequence numbers and IP id; a datagram: same
length and IP id; an error: same type, code and IP id; its addresses may change
under NAT). An ICMP error is a packet of the connection whose packet it quotes,
on the side it travels (back towards the quoted packet's source): its hops carry
that flow's tuple as the error quotes it, reversed.
A connection is one handshake: the events tracer.analysis.stream gives it (its
rules of connection identity), original and reply, before and after NAT, linked
through the tuples of its conntrack entry. Pure: no kernel, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer.analysis.context import Context
from tracer.events.model import (
    ACK,
    FIN,
    IPPROTO_UDP,
    PSH,
    RST,
    SYN,
    Conntrack,
    Event,
    PointInfo,
    Tuple,
    point_info,
)


@dataclass(frozen=True)
class Hop:
    """One point a packet passed, with its addresses there."""

    ts_ns: int
    netns: int
    netns_name: str
    dev: str
    point: str
    kind: str
    tuple: Tuple
    ct: Conntrack | None
    nat: str | None
    drop_reason: str | None = None
    untracked: bool = False  # the skb carried the "untracked" conntrack mark
    pod: str | None = None  # the pod whose netns this is ("namespace/name"), if known
    dev_pod: str | None = None  # a host-side veth: the pod at its other end, if known


@dataclass
class Packet:
    role: str  # SYN, SYN+ACK, ACK, DATA, FIN, RST (TCP); UDP; ICMP
    direction: str  # original | reply
    tcp_flags: int
    seq: int
    ack_seq: int
    ip_id: int
    hops: list[Hop] = field(default_factory=list)
    caused_by: int | None = None  # index of the packet that made the client send this RST
    length: int | None = None  # UDP: the datagram's length (header included)
    icmp: tuple[int, int] | None = None  # ICMP error: (type, code)
    icmp_from: str | None = None  # ICMP error: its source address where first seen

    @property
    def ts_ns(self) -> int:
        return self.hops[0].ts_ns

    @property
    def acks(self) -> bool:
        return bool(self.tcp_flags & ACK)


@dataclass
class Connection:
    key: Tuple  # conntrack original tuple: client -> service
    backend: tuple[str, int] | None  # where DNAT sent it (reply tuple's source)
    packets: list[Packet]
    ct_ids: set[int]
    last_ct: Conntrack | None
    isn: int | None = None  # the client's SYN sequence number; None: no SYN was seen
    proto: str = "tcp"  # tcp | udp (a UDP connection is one conntrack flow)
    # the pods ("namespace/name") holding the client's and the backend's address, if known
    client_pod: str | None = None
    backend_pod: str | None = None

    @property
    def first_seen_mid_connection(self) -> bool:
        """Its first events came after its SYN (the trace started during it)."""
        return self.isn is None

    @property
    def first_ns(self) -> int:
        return min(p.ts_ns for p in self.packets)

    @property
    def last_ns(self) -> int:
        return max(h.ts_ns for p in self.packets for h in p.hops)


def role_of(flags: int) -> str:
    if flags & RST:
        return "RST"
    if flags & SYN:
        return "SYN+ACK" if flags & ACK else "SYN"
    if flags & FIN:
        return "FIN"
    if flags & PSH:
        return "DATA"
    return "ACK"


def _nat_change(prev: Tuple, cur: Tuple) -> str | None:
    parts = []
    if (prev.dst, prev.dport) != (cur.dst, cur.dport):
        parts.append(f"DNAT {prev.dst}:{prev.dport} -> {cur.dst}:{cur.dport}")
    if (prev.src, prev.sport) != (cur.src, cur.sport):
        parts.append(f"SNAT {prev.src}:{prev.sport} -> {cur.src}:{cur.sport}")
    return "; ".join(parts) or None


def _hop(
    ev: Event, info: PointInfo, ns: tuple[str, str | None], prev: Tuple | None, ctx: Context
) -> Hop:
    reason = None
    if info.kind == "drop":
        reason = ctx.drop_reasons.get(ev.reason, f"reason-{ev.reason}")
    tup = ev.flow_tuple
    return Hop(
        ev.ts_ns,
        ev.netns,
        ns[0],
        ev.dev,
        info.name,
        info.kind,
        tup,
        ev.ct,
        _nat_change(prev, tup) if prev else None,
        reason,
        ev.untracked,
        ns[1],
        ctx.names.pod_behind(ev.netns, ev.dev) if ev.dev else None,
    )


def _reply_side(key: Tuple, events: list[Event]) -> set[Tuple]:
    """The tuples of a connection's reply direction: the key reversed, every conntrack reply."""
    return {key.reversed()} | {ev.ct.reply for ev in events if ev.ct is not None}


def _packets(events: list[Event], key: Tuple, ctx: Context) -> list[Packet]:
    reply_side = _reply_side(key, events)
    packets: list[Packet] = []
    open_by_id: dict[tuple[int, int, int, int], Packet] = {}
    places: dict[int, set[tuple[int, str, str]]] = {}  # id(packet) -> places it passed
    names: dict[int, tuple[str, str | None]] = {}  # netns -> its name and pod
    for ev in events:
        icmp = ev.is_icmp
        # an error's own addresses change under NAT: its type, code and IP id do not
        ident = (-1, ev.icmp_type, ev.icmp_code, ev.ip_id) if icmp else (
            ev.tcp_flags, ev.seq, ev.ack_seq, ev.ip_id)  # fmt: skip
        pkt = open_by_id.get(ident)
        info = point_info(ev.point)
        # Seeing the same segment again at a place it already passed means a
        # retransmission (a SYN+ACK's IP id is 0 every time): a new packet.
        place = (ev.netns, ev.dev, info.name)
        if pkt is not None and place in places[id(pkt)]:
            pkt = None
        if pkt is None:
            direction = "reply" if ev.flow_tuple in reply_side else "original"
            if icmp:
                pkt = Packet("ICMP", direction, 0, 0, 0, ev.ip_id,
                             icmp=(ev.icmp_type, ev.icmp_code), icmp_from=ev.icmp_src)  # fmt: skip
            elif ev.proto == IPPROTO_UDP:
                pkt = Packet("UDP", direction, 0, 0, 0, ev.ip_id, length=ev.seq)
            else:
                pkt = Packet(role_of(ev.tcp_flags), direction, ev.tcp_flags, ev.seq,
                             ev.ack_seq, ev.ip_id)  # fmt: skip
            packets.append(pkt)
            open_by_id[ident] = pkt
            places[id(pkt)] = set()
        places[id(pkt)].add(place)
        ns = names.get(ev.netns)
        if ns is None:
            ns = names[ev.netns] = (ctx.names.ns_name(ev.netns), ctx.names.pod_of(ev.netns))
        prev = pkt.hops[-1].tuple if pkt.hops else None
        pkt.hops.append(_hop(ev, info, ns, prev, ctx))
    _link_resets(packets)
    return packets


def _link_resets(packets: list[Packet]) -> None:
    """An RST answers the segment whose ack it carries as its sequence number."""
    for i, pkt in enumerate(packets):
        if pkt.role != "RST":
            continue
        for j in range(i - 1, -1, -1):
            cand = packets[j]
            if cand.direction != pkt.direction and cand.ack_seq == pkt.seq and cand.acks:
                pkt.caused_by = j
                break


def connection_of(
    key: Tuple, events: list[Event], ctx: Context, isn: int | None = None, proto: str = "tcp"
) -> Connection:
    """One connection from its events (in time order): tracer.analysis.stream decides which
    events those are (see its rules of connection identity)."""
    cts = [e.ct for e in events if e.ct is not None and e.ct.orig == key]
    backend = next(((ct.reply.src, ct.reply.sport) for ct in reversed(cts) if ct.dnat), None)
    return Connection(
        key,
        backend,
        _packets(events, key, ctx),
        {c.id for c in cts},
        cts[-1] if cts else None,
        isn,
        proto,
        *endpoint_pods(key, backend, ctx),
    )


def endpoint_pods(
    key: Tuple, backend: tuple[str, int] | None, ctx: Context
) -> tuple[str | None, str | None]:
    """The pods holding a connection's client address and its backend's, if known."""
    return ctx.names.pod_of_ip(key.src), ctx.names.pod_of_ip(backend[0]) if backend else None
