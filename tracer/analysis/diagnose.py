"""Connection -> verdict, and for a broken one: where, why, the evidence and the fix.

Pure over a reassembled connection and the Context (names, sysctls, losses).
A cause code is given only when the evidence supports it; otherwise the break
is `unexplained` with the place the path stopped, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracer.analysis import drops
from tracer.analysis.context import Context
from tracer.analysis.reassemble import Connection, Hop, Packet
from tracer.events.model import (
    ICMP_DEST_UNREACH,
    ICMP_FRAG_NEEDED,
    ICMP_PORT_UNREACH,
    IPS_SEEN_REPLY,
    NETFILTER_KINDS,
    icmp_name,
)

SYSCTL_BR_NF = "net.bridge.bridge-nf-call-iptables"


@dataclass(frozen=True)
class Break:
    packet_role: str
    packet_index: int
    netns: str
    dev: str
    point: str
    cause: str
    explanation: str
    evidence: tuple[str, ...]
    fix: str
    via: tuple[str, ...] = ()  # devices the packet crossed in that netns
    hook: str | None = None  # netfilter hook of the rule that dropped it, when known
    rule: str | None = None  # that rule, when its counter showed it
    drop_reason: str | None = None  # the kernel's reason, when the break is a drop

    @property
    def bridged(self) -> bool:
        """The break names the bridge (dev) that switched the packet between two of its
        ports (via) without a hop of its own."""
        return self.dev not in self.via and len(self.via) >= 2

    @property
    def where(self) -> str:
        """The place in words. A packet a bridge switched port to port has no hop on the
        bridge the break names (dev), so it is said as such: "SYN+ACK bridged by node/cni0
        from veth-b to veth-a (last seen at net_dev_start_xmit)"."""
        if self.bridged:
            return (
                f"{self.packet_role} bridged by {self.netns}/{self.dev} from {self.via[0]} "
                f"to {self.via[-1]} (last seen at {self.point})"
            )
        return f"{self.packet_role} at {self.netns}/{self.dev} ({self.point})"


@dataclass(frozen=True)
class Exchange:
    """A UDP request and what answered it: indices into the connection's packets."""

    request: int | None  # None: a reply or error with no request seen before it
    reply: int | None = None
    icmp: int | None = None  # the ICMP error that came back instead
    ok: bool = False  # a reply reached the client from the service address
    pending: bool = False  # unanswered, but the trace ended within the reply timeout


@dataclass(frozen=True)
class Diagnosis:
    verdict: str  # ok | broken | recovered | incomplete
    brk: Break | None
    notes: tuple[str, ...] = ()
    exchanges: tuple[Exchange, ...] = ()  # UDP only


@dataclass(frozen=True)
class _Roles:
    """Where the client lives and where the service was translated."""

    client_ns: int | None
    nat_ns: int | None
    nat_hop: Hop | None


def _roles(conn: Connection) -> _Roles:
    originals = [p for p in conn.packets if p.direction == "original"]
    client_ns = originals[0].hops[0].netns if originals else None
    for pkt in originals:
        for hop in pkt.hops:
            if hop.nat and "DNAT" in hop.nat:
                return _Roles(client_ns, hop.netns, hop)
    for pkt in originals:
        for hop in pkt.hops:
            if hop.ct is not None and hop.ct.dnat:
                return _Roles(client_ns, hop.netns, hop)
    return _Roles(client_ns, None, None)


def _delivered(pkt: Packet, client_ns: int | None) -> Hop | None:
    """The hop at which a reply reached the client, if it got there: the last hop of its
    first stretch inside the client's namespace, i.e. the form the client's stack saw.

    A reply whose first hops are in the client's namespace was sent from there: the
    client is its own backend (a pod calling its own Service, hairpinned by the bridge).
    Those hops are the backend's transmit, before reverse NAT; the reply is delivered
    only when it comes back. The last hop, not the first, because on the way in a reply
    may still be translated inside the client's namespace (a client in the node netns
    gets it un-NATed at INPUT, after the device saw the backend's address).
    """
    hops = pkt.hops
    start = 0
    while start < len(hops) and hops[start].netns == client_ns:
        start += 1  # the backend's own transmit (self-call); for other replies none
    arrived = next((i for i in range(start, len(hops)) if hops[i].netns == client_ns), None)
    if arrived is None:
        return None
    end = arrived
    while end + 1 < len(hops) and hops[end + 1].netns == client_ns:
        end += 1
    return hops[end]


def _fmt(ip: str, port: int) -> str:
    return f"{ip}:{port}"


def diagnose(conn: Connection, ctx: Context) -> Diagnosis:
    if conn.proto == "udp":
        return _diagnose_udp(conn, ctx)
    roles = _roles(conn)
    brk: Break | None = None
    success = False
    # after the handshake: a reply that reached the client untranslated (its data, ACKs,
    # FIN or RST bridged past reverse NAT) breaks the connection, unless a translated
    # reply of it got through later
    later: Break | None = None
    later_ok = False
    for i, pkt in enumerate(conn.packets):
        if pkt.direction == "reply" and pkt.role == "SYN+ACK":
            hop = _delivered(pkt, roles.client_ns)
            if hop is None:
                continue
            if _translated(hop, conn, ctx):
                success = True
            elif brk is None:
                brk = _untranslated_reply(conn, i, pkt, hop, roles, ctx)
        elif pkt.direction == "reply" and success and brk is None:
            hop = _delivered(pkt, roles.client_ns)
            if hop is None:
                continue
            if _translated(hop, conn, ctx):
                later_ok = later_ok or (later is not None and pkt.role != "RST")
            elif later is None:
                later = _untranslated_reply(conn, i, pkt, hop, roles, ctx)
        elif pkt.direction == "original" and pkt.role in ("ACK", "DATA", "FIN") and not success:
            success = any(p.role == "SYN+ACK" for p in conn.packets[:i])
    if brk is None and not success:
        brk = _refused(conn, roles, ctx) or _dropped(conn, roles, ctx)
    notes: list[str] = []
    verdict = "recovered" if brk and success else "broken" if brk else "ok" if success else ""
    if brk is None and later is not None:
        brk, verdict = later, "recovered" if later_ok else "broken"
    if not verdict:
        brk, verdict, why = _unanswered(conn, ctx)
        notes.extend(why)
    if brk is not None and verdict == "broken":
        brk = _no_such_service(conn, brk, ctx) or brk
    if brk is None and verdict == "ok":
        found = _mtu_blackhole(conn, roles, ctx)
        if found is not None:
            brk, verdict = found
    lost = _overlapping_loss(conn, ctx)
    if lost:
        notes.append(lost)
        verdict = "incomplete"
    return Diagnosis(verdict, brk, tuple(notes))


def _translated(hop: Hop, conn: Connection, ctx: Context) -> bool:
    """A reply delivered to the client comes from the Service: the address and port the
    client called (a range: its connection's own, as pods may share the range)."""
    if ctx.service_prefix >= 32:
        return ctx.is_service(hop.tuple.src, hop.tuple.sport)
    return (hop.tuple.src, hop.tuple.sport) == (conn.key.dst, conn.key.dport)


def _diagnose_udp(conn: Connection, ctx: Context) -> Diagnosis:
    """A UDP flow: each request (original datagram) is answered by the next reply that
    reaches the client, or by an ICMP error that does. It is ok when every request got a
    reply from the service address; the break is on the first reply or error that went
    astray, else on the first request nothing answered within the reply timeout. A
    request still within it when the trace ended is pending, not failed."""
    roles = _roles(conn)
    pending: list[int] = []
    exchanges: list[Exchange] = []
    brk: Break | None = None
    for i, pkt in enumerate(conn.packets):
        if pkt.role == "UDP" and pkt.direction == "original":
            pending.append(i)
            continue
        if pkt.direction != "reply":
            continue  # the client's own ICMP error about a reply it did not expect
        hop = _delivered(pkt, roles.client_ns)
        if hop is None:
            continue  # lost on its way: the request stays unanswered
        req = pending.pop(0) if pending else None
        translated = _translated(hop, conn, ctx)
        if pkt.role == "UDP":
            exchanges.append(Exchange(req, reply=i, ok=translated))
        else:
            exchanges.append(Exchange(req, icmp=i))
        if brk is None and not translated:
            brk = _untranslated_reply(conn, i, pkt, hop, roles, ctx)
        elif brk is None and pkt.role == "ICMP":
            brk = _icmp_error(conn, i, pkt, hop, roles, ctx)
    overdue = [i for i in pending
               if ctx.end_ns - conn.packets[i].hops[-1].ts_ns >= ctx.reply_timeout_ns]  # fmt: skip
    exchanges += [Exchange(i, pending=i not in overdue) for i in pending]
    exchanges.sort(key=lambda x: x.request if x.request is not None else -1)
    notes: list[str] = []
    if brk is None and overdue:
        brk = _dropped(conn, roles, ctx)
        if brk is None:
            first = conn.packets[overdue[0]]
            brk = _no_reply(conn, overdue[0], ctx.end_ns - first.hops[-1].ts_ns)
    failed = [x.request for x in exchanges if not x.ok and not x.pending and x.request is not None]
    if brk is not None and failed:
        brk = _stale_entry(conn, brk, failed[0], roles, ctx) or brk
    if len(overdue) < len(pending):
        notes.append("the trace ended before the reply to the last request was due")
    if not any(p.role == "UDP" and p.direction == "original" for p in conn.packets):
        notes.append("no request of this flow was seen (it began before the trace)")
    decided = [x for x in exchanges if not x.pending]
    if brk is not None:
        verdict = "recovered" if decided and decided[-1].ok else "broken"
    elif not decided or not any(x.request is not None for x in decided):
        verdict = "incomplete"
    else:
        verdict = "ok"
    lost = _overlapping_loss(conn, ctx)
    if lost:
        notes.append(lost)
        verdict = "incomplete"
    return Diagnosis(verdict, brk, tuple(notes), tuple(exchanges))


def _dnat_targets(rules: tuple[str, ...]) -> set[str]:
    """ "IP:PORT" of every DNAT in NAT rules (iptables' --to-destination, nft's dnat to)."""
    out = set()
    for rule in rules:
        for word in ("--to-destination ", "dnat to "):
            at = rule.find(word)
            if at >= 0:
                out.add(rule[at + len(word) :].split()[0])
    return out


def _stale_entry(
    conn: Connection, brk: Break, request: int, roles: _Roles, ctx: Context
) -> Break | None:
    """A UDP flow whose conntrack entry DNATs to a backend that kube-proxy's rules no
    longer have: the entry outlived its endpoint (kube-proxy deletes such entries when an
    endpoint goes away; a flow kept alive by its client keeps it otherwise)."""
    if conn.backend is None or roles.nat_ns is None or roles.nat_hop is None:
        return None
    rules = ctx.names.service_rules(roles.nat_ns)
    targets = _dnat_targets(rules or ())
    backend = _fmt(*conn.backend)
    if not targets or backend in targets:
        return None
    ns = ctx.names.ns_name(roles.nat_ns)
    h = roles.nat_hop
    key = conn.key
    state = h.ct.to_dict()["state"] if h.ct is not None else "unknown"
    entry = (f"conntrack entry {key} / reply {conn.backend[0]}:{conn.backend[1]} -> "
             f"{key.src}:{key.sport} in {ns} DNATs the flow to {backend}")  # fmt: skip
    rules_say = (f"kube-proxy's rules in {ns} DNAT {key.dst}:{key.dport} to "
                 f"{', '.join(sorted(targets))} only: {backend} is no endpoint there")  # fmt: skip
    reused = (f"the requests reached the DNAT at {h.point} as {state} packets of that "
              "entry: NAT reused its binding, the rules were never consulted again")  # fmt: skip
    evidence = (entry, rules_say, reused, *brk.evidence)
    # the break is on the first failed request, at the DNAT that applied the stale binding
    # (where it was lost after that, or what answered it, is in the evidence)
    return Break(
        "UDP", request, h.netns_name, h.dev, h.point,
        "stale-conntrack-entry",
        f"The flow's conntrack entry in {ns} still sends it to {backend}, which is no longer "
        f"an endpoint of {key.dst}:{key.dport} in kube-proxy's rules there "
        f"({', '.join(sorted(targets))}). Each datagram of the flow refreshes the entry, so "
        f"while the client keeps the flow ({key.src}:{key.sport}) alive it never reaches a "
        "current endpoint; its requests went unanswered.",
        evidence,
        f"Delete the entry in {ns}: conntrack -D -p udp --orig-src {key.src} --sport "
        f"{key.sport} --orig-dst {key.dst} --dport {key.dport} (or every entry to the old "
        f"endpoint: conntrack -D -p udp --reply-src {conn.backend[0]}). kube-proxy deletes "
        "them itself when an endpoint goes away: check that the node has the conntrack "
        "binary and kube-proxy's log for conntrack errors (kubernetes#59368, #126130).",
    )  # fmt: skip


def _no_reply(conn: Connection, index: int, waited: float) -> Break:
    pkt = conn.packets[index]
    hop = pkt.hops[-1]
    return Break(
        "UDP", index, hop.netns_name, hop.dev, hop.point, "unexplained",
        f"No reply to the UDP request was seen within {waited / 1e9:.1f}s; the request was "
        f"last seen at {hop.netns_name}/{hop.dev} ({hop.point}) as {hop.tuple}.",
        (drops.path_text(pkt),),
        "Look beyond the last point seen: is the backend listening on that UDP port, is "
        "there a route, does a firewall outside the traced points drop it?",
    )  # fmt: skip


def _icmp_error(
    conn: Connection, index: int, pkt: Packet, hop: Hop, roles: _Roles, ctx: Context
) -> Break:
    """An ICMP error reached the client in answer to its request (translated back)."""
    assert pkt.icmp is not None
    what = icmp_name(*pkt.icmp)
    first = pkt.hops[0]
    sender = pkt.icmp_from or first.tuple.src
    proto = conn.proto
    svc = _fmt(conn.key.dst, conn.key.dport)
    evidence = [
        drops.path_text(pkt),
        (
            f"ICMP {what} (type {pkt.icmp[0]}, code {pkt.icmp[1]}) sent by {sender} in "
            f"{first.netns_name}, quoting {hop.tuple.reversed()}"
        ),
    ]
    found = drops.first_drop(conn, roles.client_ns)
    if found is not None:  # the rule or stack drop that answered with it
        i, dropped, dhop = found
        f = drops.classify(conn, i, dropped, dhop, roles.client_ns, ctx)
        if f.cause not in ("packet-dropped", "unexplained"):
            return Break(
                dropped.role, i, dhop.netns_name, dhop.dev, dhop.point, f.cause,
                f.explanation, (*f.evidence, *evidence), f.fix, hook=f.hook, rule=f.rule,
                drop_reason=dhop.drop_reason,
            )  # fmt: skip
    backend = conn.backend
    if pkt.icmp == (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH) and backend and sender == backend[0]:
        return Break(
            "ICMP", index, first.netns_name, first.dev, first.point, "backend-refused",
            f"The backend {_fmt(*backend)} answered the {proto.upper()} request with ICMP port "
            f"unreachable: nothing listens on that port in {first.netns_name}. The path and "
            "NAT worked; the client sees 'connection refused'.",
            tuple(evidence),
            "Make the Service's targetPort (and protocol) match the port the pods listen on "
            "(kubectl get endpointslices; compare with the container's ports), or fix the "
            "server so it listens on the pod's address.",
        )  # fmt: skip
    return Break(
        "ICMP", index, first.netns_name, first.dev, first.point, "unexplained",
        f"The request to {svc} was answered by ICMP {what} from {sender} "
        f"({first.netns_name}); hairtrace has no cause code for this error here.",
        tuple(evidence),
        f"Look at why {sender} cannot deliver the request: its routes, MTU and firewall.",
    )  # fmt: skip


TOO_BIG = frozenset({"PKT_TOO_BIG", "FRAG_TOO_FAR"})


def _mtu_blackhole(conn: Connection, roles: _Roles, ctx: Context) -> tuple[Break, str] | None:
    """After the handshake, segments dropped for being larger than the path's MTU, and no
    ICMP fragmentation-needed about them reached their sender: the sender keeps sending
    them (path MTU discovery never learns), the transfer stalls. Recovered when the
    connection still closed from the sender's side after the last such drop."""
    drops_at = [(i, p, h) for i, p in enumerate(conn.packets) for h in p.hops
                if h.kind == "drop" and h.drop_reason in TOO_BIG]  # fmt: skip
    if not drops_at:
        return None
    i, pkt, hop = drops_at[0]
    sender = pkt.hops[0]
    other = "reply" if pkt.direction == "original" else "original"
    icmps = [p for p in conn.packets if p.role == "ICMP" and p.direction == other
             and p.icmp == (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED)]  # fmt: skip
    delivered = [p for p in icmps
                 if p.hops[-1].netns == sender.netns and p.hops[-1].kind != "drop"]  # fmt: skip
    if delivered:
        return None  # path MTU discovery was told; what follows is its business
    mtus = ctx.names.mtus(hop.netns)
    evidence = [
        drops.path_text(pkt),
        (
            f"{len(drops_at)} {pkt.direction} segment(s) of the connection freed at "
            f"{hop.netns_name}/{hop.dev} ({hop.drop_reason}): larger than the MTU of the route "
            "they were to leave by"
        ),
    ]
    if mtus:
        evidence.append(f"device MTUs in {hop.netns_name}: "
                        + ", ".join(f"{d} {m}" for d, m in sorted(mtus.items())))  # fmt: skip
    sender_mtu = ctx.names.mtus(sender.netns).get(sender.dev)
    if sender_mtu:
        evidence.append(f"the sender's {sender.netns_name}/{sender.dev} has MTU {sender_mtu}")
    if icmps:
        lost = icmps[0]
        end = lost.hops[-1]
        evidence.append(
            f"{len(icmps)} ICMP fragmentation-needed sent by {lost.icmp_from} never reached "
            f"the sender: the first was last seen at {end.netns_name}/{end.dev or '-'} "
            f"({end.point}{', ' + end.drop_reason if end.drop_reason else ''})"
        )
        for rd in ctx.rule_drops if ctx.rule_drops_netns == end.netns else ():
            evidence.append(f"rule whose counter rose: {rd.rule} (chain {rd.chain})")
    else:
        evidence.append("no ICMP fragmentation-needed about them was seen: none was sent, "
                        "or it left no trace on the traced points")  # fmt: skip
    closed = any(p.role in ("FIN", "RST") and p.direction == pkt.direction
                 for p in conn.packets[i + 1 :])  # fmt: skip
    verdict = "recovered" if closed else "broken"
    if pkt.direction == "reply":
        who = f"the backend {_fmt(*conn.backend)}" if conn.backend else "the server"
    else:
        who = f"the client {_fmt(conn.key.src, conn.key.sport)}"
    brk = Break(
        pkt.role, i, hop.netns_name, hop.dev, hop.point, "mtu-blackhole",
        f"Segments from {who} larger than the path's MTU were dropped at "
        f"{hop.netns_name}/{hop.dev}, and no ICMP fragmentation-needed reached the sender, "
        "so it keeps sending them at the same size: the handshake worked, the transfer "
        "stalls (an MTU black hole).",
        tuple(evidence),
        "Give the pods the overlay's MTU (VXLAN: 50 bytes less than the underlay; the CNI's "
        "mtu, flannel's FLANNEL_MTU, calico's veth_mtu) and let ICMP fragmentation-needed "
        "(type 3 code 4) through every firewall on the path; TCP MSS clamping "
        "(--clamp-mss-to-pmtu) works around it.",
        drop_reason=hop.drop_reason,
    )  # fmt: skip
    return brk, verdict


def _no_such_service(conn: Connection, brk: Break, ctx: Context) -> Break | None:
    """A SYN that was never DNATed, to an address or port kube-proxy's rules do not have
    (a port the Service lacks, a mistyped address): the rules, not the path, are why.
    Said only where the rules were read and are kube-proxy's (service_ports not None)."""
    if brk.packet_role != "SYN" or conn.backend is not None:
        return None
    syn = conn.packets[brk.packet_index]
    want = f"{conn.key.dport}/{conn.proto}"
    for ns in dict.fromkeys(h.netns for h in syn.hops):
        ports = ctx.names.service_ports(ns)
        if ports is None:
            continue
        if want in ports:
            return None
        name = ctx.names.ns_name(ns)
        return Break(
            "SYN", brk.packet_index, brk.netns, brk.dev, brk.point, "no-such-service",
            f"kube-proxy's rules in {name} have no Service {conn.key.dst}:{conn.key.dport}"
            + (f" (the Service {conn.key.dst} has {', '.join(ports)})" if ports else
               f" (no Service has the address {conn.key.dst})")
            + ", so nothing translated the SYN to a backend; it went where the address "
            f"itself leads and ended at {brk.netns}/{brk.dev} ({brk.point}).",
            (*_service_evidence(conn, ports, name, ns, ctx), *brk.evidence),
            "Call a port the Service has (kubectl get service -A -o wide | grep "
            f"{conn.key.dst}), or add the port to the Service's spec.ports; check the address "
            "for a typo (kubectl get service -A --field-selector spec.clusterIP=ADDRESS).",
            brk.via, brk.hook, brk.rule, brk.drop_reason,
        )  # fmt: skip
    return None


def _service_evidence(
    conn: Connection, ports: tuple[str, ...], name: str, ns: int, ctx: Context
) -> tuple[str, ...]:
    svc, port = conn.key.dst, conn.key.dport
    if ports:
        line = f"kube-proxy's rules in {name} give {svc} the ports {', '.join(ports)}, not {port}/{conn.proto}"
        return (line,)
    near = ctx.names.nearest_services(ns)
    line = f"kube-proxy's rules in {name} have no Service with the address {svc}"
    if near:
        line += f"; the closest Service addresses there: {', '.join(near)}"
    return (line,)


def _overlapping_loss(conn: Connection, ctx: Context) -> str | None:
    lo, hi = conn.first_ns, max(conn.last_ns, conn.first_ns) + ctx.reply_timeout_ns
    for first, last in ctx.loss_windows:
        if first <= hi and last >= lo:
            return "ring-buffer events were lost while this connection was traced"
    return None


def _unanswered(conn: Connection, ctx: Context) -> tuple[Break | None, str, list[str]]:
    syns = [(i, p) for i, p in enumerate(conn.packets) if p.role == "SYN"]
    if not syns:
        return (
            None,
            "incomplete",
            ["no SYN of this connection was seen (it began before the trace)"],
        )
    i, last_syn = syns[-1]
    waited = ctx.end_ns - last_syn.hops[-1].ts_ns
    if any(p.role == "SYN+ACK" for p in conn.packets) or waited < ctx.reply_timeout_ns:
        return None, "incomplete", ["the trace ended before the handshake finished"]
    hop = last_syn.hops[-1]
    brk = Break(
        "SYN",
        i,
        hop.netns_name,
        hop.dev,
        hop.point,
        "unexplained",
        f"No SYN+ACK was seen within {waited / 1e9:.1f}s; the SYN was last seen at "
        f"{hop.netns_name}/{hop.dev} ({hop.point}) as {hop.tuple}.",
        (drops.path_text(last_syn),),
        "Look beyond the last point seen: is the backend listening, is there a route, "
        "does a firewall outside the traced points drop it?",
    )
    return brk, "broken", []


def _dropped(conn: Connection, roles: _Roles, ctx: Context) -> Break | None:
    found = drops.first_drop(conn, roles.client_ns)
    if found is None:
        return None
    i, pkt, hop = found
    f = drops.classify(conn, i, pkt, hop, roles.client_ns, ctx)
    return Break(
        pkt.role, i, hop.netns_name, hop.dev, hop.point, f.cause, f.explanation, f.evidence,
        f.fix, hook=f.hook, rule=f.rule, drop_reason=hop.drop_reason,
    )  # fmt: skip


def _refused(conn: Connection, roles: _Roles, ctx: Context) -> Break | None:
    found = drops.refused(conn, roles.client_ns)
    if found is None:
        return None
    i, rst = found
    first = rst.hops[0]
    backend = f"{conn.backend[0]}:{conn.backend[1]}" if conn.backend else str(first.tuple.src)
    evidence = [drops.path_text(p) for p in conn.packets[: i + 1] if p.role in ("SYN", "RST")][-2:]
    evidence.append(f"the RST was sent by {first.netns_name} ({first.tuple.src}:"
                    f"{first.tuple.sport}), not by the client")  # fmt: skip
    no_socket = [h for p in conn.packets for h in p.hops
                 if p.role == "SYN" and h.drop_reason == "NO_SOCKET"]  # fmt: skip
    if no_socket:
        evidence.append(f"the SYN was freed in {no_socket[0].netns_name} with reason NO_SOCKET: "
                        "no socket listens on that port")  # fmt: skip
    return Break(
        "RST", i, first.netns_name, first.dev, first.point, "backend-refused",
        f"The backend {backend} answered the SYN with a reset: nothing listens on that port "
        f"in {first.netns_name}. The path and NAT worked; the client sees 'connection refused'.",
        tuple(evidence),
        "Make the Service's targetPort match the port the pods listen on (kubectl get "
        "endpointslices; compare with the container's ports), or fix the server so it listens "
        "on the pod's address.",
    )  # fmt: skip


def _untranslated_reply(
    conn: Connection, index: int, pkt: Packet, delivered: Hop, roles: _Roles, ctx: Context
) -> Break:
    svc = _fmt(conn.key.dst, conn.key.dport)
    seen_src = _fmt(delivered.tuple.src, delivered.tuple.sport)
    client_name = delivered.netns_name
    evidence: list[str] = []
    if roles.nat_hop is not None:
        h = roles.nat_hop
        ct = h.ct
        what = h.nat or (f"conntrack binding {ct.orig} / reply {ct.reply}" if ct else "")
        first = "SYN" if conn.proto == "tcp" else "the request"
        evidence.append(
            f"{first} {conn.key} was DNATed in netns {h.netns_name} at {h.point} ({what})"
        )
    nat_ns = roles.nat_ns
    in_nat = [h for h in pkt.hops if h.netns == nat_ns]
    nf_seen = [h for h in in_nat if h.kind in NETFILTER_KINDS]
    bridge = _bridged_by(in_nat, ctx, nat_ns) if nat_ns is not None else None
    place = in_nat[-1] if in_nat else delivered
    if in_nat:
        path = " -> ".join(f"{h.dev}:{h.point}" for h in in_nat)
        evidence.append(
            f"{pkt.role} {pkt.hops[0].tuple} crossed netns {place.netns_name} as "
            f"{path}" + (f" (ports of bridge {bridge})" if bridge else "")
        )
    if not nf_seen and in_nat:
        evidence.append(
            f"no conntrack, NAT or netfilter hook saw the {pkt.role} in netns "
            f"{place.netns_name}: reverse translation never ran"
        )
        if any(h.kind == "bridge_nf" for h in in_nat):
            evidence.append(
                "br_nf_pre_routing was entered but handed the frame to no IPv4 hook "
                "(it returns at once when bridge-nf-call-iptables is off)"
            )
    evidence.append(
        f"client netns {client_name} received the {pkt.role} from {seen_src} "
        f"instead of the service address {svc}"
    )
    reset = next((p for p in conn.packets if p.role == "RST" and p.caused_by == index), None)
    if reset is not None:
        evidence.append(
            f"the client answered with RST {reset.hops[0].tuple} (in {reset.hops[0].netns_name})"
        )
    if conn.proto == "udp":
        # the client's socket expects the service address: the reply it got is for no
        # socket, which the stack answers with ICMP port unreachable
        unreach = next((p for p in conn.packets[index + 1 :] if p.role == "ICMP"
                        and p.direction == "original" and p.hops[0].netns == delivered.netns),
                       None)  # fmt: skip
        if unreach is not None and unreach.icmp is not None:
            evidence.append(
                f"the client answered with ICMP {icmp_name(*unreach.icmp)} to "
                f"{seen_src} (in {unreach.hops[0].netns_name}): no socket of it expects that source"
            )
    if conn.last_ct is not None and not conn.last_ct.status & IPS_SEEN_REPLY:
        evidence.append(
            f"conntrack entry {conn.last_ct.orig} never saw a reply "
            "(no SEEN_REPLY, shown as [UNREPLIED] by conntrack -L)"
        )
    cause = "unexplained"
    explanation = (
        f"The {pkt.role} reached the client with the backend's source {seen_src} "
        f"instead of {svc}; hairtrace cannot tell why reverse NAT did not run."
    )
    fix = (
        "Check that replies of DNATed connections return through the namespace that holds "
        "the conntrack entry."
    )
    no_entry = [h for h in nf_seen if h.kind == "netfilter" and h.ct is None and not h.untracked]
    if no_entry:
        h = no_entry[0]
        evidence.append(
            f"the {pkt.role} carried no conntrack entry at {h.netns_name}/{h.dev} ({h.point}): "
            "conntrack classified it INVALID, so NAT could not reverse-translate it"
        )
        cause = "reply-without-conntrack"
        explanation = (
            f"The {pkt.role} from {seen_src} found no conntrack entry in {h.netns_name} "
            f"(flushed, expired, evicted or looked up in another zone) and reached the client "
            f"untranslated instead of from {svc}."
        )
        fix = drops.NO_ENTRY_FIX
    elif bridge is not None and not nf_seen and nat_ns is not None:
        # its value when the packet crossed (it may have changed during the trace); while
        # it was changing, 0 is what explains a bridged reply
        values = ctx.names.sysctl_at(nat_ns, SYSCTL_BR_NF, place.ts_ns)
        value = "0" if "0" in values else values[-1]
        shown = " or ".join("absent" if v is None else v for v in values)
        changing = " (it changed then)" if len(values) > 1 else ""
        evidence.append(f"{SYSCTL_BR_NF} = {shown} in netns {place.netns_name}{changing}")
        cause, explanation, fix = _bridge_cause(
            value, pkt.role, bridge, place.netns_name, seen_src, svc, conn.proto
        )
    dev = bridge or place.dev
    via = tuple(dict.fromkeys(h.dev for h in in_nat))
    return Break(
        pkt.role,
        index,
        place.netns_name,
        dev,
        place.point,
        cause,
        explanation,
        tuple(evidence),
        fix,
        via,
    )


def _bridged_by(hops: list[Hop], ctx: Context, ns: int) -> str | None:
    """The bridge that switched the packet in ns, if it entered and left by its ports
    without being delivered up to the bridge device itself."""
    if any(h.kind == "bridge" and h.point == "br_forward" for h in hops):
        return ctx.names.bridge_of(ns, hops[0].dev) or "bridge"
    ports = [h for h in hops if h.kind in ("dev_rx", "dev_tx")]
    if len(ports) < 2 or any(ctx.names.is_bridge(ns, h.dev) for h in ports):
        return None
    masters = {ctx.names.bridge_of(ns, h.dev) for h in ports}
    if len(masters) == 1 and None not in masters:
        return masters.pop()
    return None


def _bridge_cause(
    value: str | None, role: str, bridge: str, ns: str, seen: str, svc: str, proto: str = "tcp"
) -> tuple[str, str, str]:
    then = "resets" if proto == "tcp" else "drops it (the request times out)"
    if value is None:
        return (
            "br-netfilter-not-loaded",
            (
                f"The {role} from {seen} was switched by bridge {bridge} in {ns} straight to "
                f"the client. br_netfilter is not loaded, so bridged frames never reach "
                f"iptables/conntrack and the reply's source is not translated back to {svc}."
            ),
            (
                f"Load br_netfilter (modprobe br_netfilter; persist it in "
                f"/etc/modules-load.d/) and set {SYSCTL_BR_NF}=1 in {ns}."
            ),
        )
    if value == "0":
        return (
            "bridge-nf-call-iptables-off",
            (
                f"The {role} from {seen} was switched by bridge {bridge} in {ns} straight to "
                f"the client without passing netfilter ({SYSCTL_BR_NF}=0), so conntrack never "
                f"reverse-translated its source to the service address {svc}; the client "
                f"does not recognise it and {then}."
            ),
            (
                f"Set {SYSCTL_BR_NF}=1 in {ns} (sysctl -w {SYSCTL_BR_NF}=1, persisted in "
                f"/etc/sysctl.d/); kube-proxy needs it whenever client and backend pods "
                f"share a bridge."
            ),
        )
    return (
        "unexplained",
        (
            f"The {role} from {seen} was bridged by {bridge} in {ns} without netfilter "
            f"although {SYSCTL_BR_NF}={value}; hairtrace cannot tell why."
        ),
        "Check the bridge's own nf_call_iptables setting and ebtables/nftables bridge rules.",
    )
