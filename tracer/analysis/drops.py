"""Why a packet of a failed connection never arrived: the drop, its place and its cause.

Each cause is named only from evidence in the events and the topology snapshot:
the drop reason the kernel gave, the namespace and device, what conntrack and NAT
did before, the sysctls, bridge-port flags, the Service's rules and the DROP/REJECT
rules whose counters rose. Anything else stays `packet-dropped` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracer.analysis.context import Context, RuleDrop
from tracer.analysis.reassemble import Connection, Hop, Packet
from tracer.events.model import IPS_CONFIRMED, NETFILTER_KINDS

# Drops that are the normal end of a segment nobody wanted (a reset's target, an
# unexpected SYN+ACK in the client): consequences, never the place a path broke.
CONSEQUENCES = frozenset({"NO_SOCKET", "TCP_RESET", "TCP_FLAGS", "TCP_INVALID_SEQUENCE"})

# The fix for a reply that found no conntrack entry, dropped or delivered untranslated.
NO_ENTRY_FIX = (
    "Find what removes or hides the entry between SYN and SYN+ACK: conntrack -L / -E in "
    "that namespace, conntrack flushes (kube-proxy on endpoint changes), nf_conntrack_max "
    "and its 'table full' messages, CT --zone / NOTRACK rules in the raw table."
)


@dataclass(frozen=True)
class Finding:
    """What drops.classify found; diagnose turns it into a Break."""

    packet_index: int
    hop: Hop
    cause: str
    explanation: str
    evidence: tuple[str, ...]
    fix: str
    hook: str | None = None
    rule: str | None = None


def path_text(pkt: Packet) -> str:
    return f"{pkt.role} path: " + " -> ".join(f"{h.netns_name}/{h.dev}:{h.point}" for h in pkt.hops)


def first_drop(conn: Connection, client_ns: int | None) -> tuple[int, Packet, Hop] | None:
    """The first drop that ended a packet on its way, not as a consequence."""
    for i, pkt in enumerate(conn.packets):
        if pkt.role == "RST":
            continue  # resets are dropped by whoever they reach; they are never the fault
        for hop in pkt.hops:
            if hop.kind != "drop" or hop.drop_reason in CONSEQUENCES:
                continue
            if hop.netns == client_ns and hop.drop_reason == "NOT_SPECIFIED":
                continue  # the client discarding something it did not ask for
            return i, pkt, hop
    return None


def _last_nf_before(pkt: Packet, hop: Hop) -> Hop | None:
    idx = pkt.hops.index(hop)
    return next(
        (h for h in reversed(pkt.hops[:idx]) if h.netns == hop.netns and h.kind in NETFILTER_KINDS),
        None,
    )


def _no_entry_hop(pkt: Packet, ns: int) -> Hop | None:
    """A netfilter hook point in ns (all sit after conntrack's priority) where the packet
    carried no conntrack entry and was not marked untracked: conntrack found it INVALID."""
    return next(
        (
            h
            for h in pkt.hops
            if h.netns == ns and h.kind == "netfilter" and h.ct is None and not h.untracked
        ),
        None,
    )


def _rules_in(ctx: Context, ns: int) -> tuple[RuleDrop, ...]:
    if ctx.rule_drops_netns is not None and ctx.rule_drops_netns != ns:
        return ()
    return ctx.rule_drops


def _rule_for(ctx: Context, ns: int) -> RuleDrop | None:
    """The rule that dropped it, when the counters point at exactly one."""
    rules = _rules_in(ctx, ns)
    return rules[0] if len(rules) == 1 else None


def _rule_evidence(ctx: Context, ns: int) -> list[str]:
    rules = _rules_in(ctx, ns)
    if not rules:
        return ["no DROP/REJECT rule counter of that namespace rose (or counters were not read)"]
    head = (
        "rule whose counter rose during the trace"
        if len(rules) == 1
        else "rules whose counters rose during the trace (which one dropped this packet "
        "cannot be told apart)"
    )
    return [head + ": " + "; ".join(
        f"{r.rule} (table {r.table}, chain {r.chain}, hook {r.hook or 'unknown'}, "
        f"{r.packets} packet(s))" for r in rules
    )]  # fmt: skip


def classify(
    conn: Connection, index: int, pkt: Packet, hop: Hop, client_ns: int | None, ctx: Context
) -> Finding:
    """The cause of a drop of conn.packets[index] at hop."""
    reason = hop.drop_reason or "unknown"
    where = f"{hop.netns_name}/{hop.dev}"
    ev = [path_text(pkt), f"drop reason: {reason} at {where}"]
    last_nf = _last_nf_before(pkt, hop)
    after = f" after {last_nf.point}" if last_nf else ""
    backend = conn.backend
    self_call = backend is not None and backend[0] == conn.key.src

    if pkt.direction == "reply":
        missing = _no_entry_hop(pkt, hop.netns)
        if missing is not None:
            return _reply_without_conntrack(conn, index, pkt, hop, missing, reason, ev, ctx)

    if backend is not None and self_call and pkt.role == "SYN":
        if hop.netns == client_ns and hop.tuple.src == hop.tuple.dst:
            ev.append(
                f"the SYN was DNATed to the client's own address {backend[0]}:{backend[1]} "
                "with its source unchanged (no masquerade)"
            )
            return Finding(
                index, hop, "hairpin-without-masquerade",
                f"The pod called its own Service and was chosen as the backend. Without the "
                f"hairpin masquerade (SNAT to the node) the SYN came back to {hop.netns_name} "
                f"with the pod's own address as source and was discarded ({reason}); even if "
                f"accepted, the pod would answer itself directly, never through reverse NAT.",
                tuple(ev),
                "Restore kube-proxy's rule in the endpoint chain: -A KUBE-SEP-... -s "
                f"{backend[0]}/32 -j KUBE-MARK-MASQ (let kube-proxy resync; do not remove it by hand).",
            )  # fmt: skip
        flag = ctx.names.hairpin(hop.netns, hop.dev)
        if flag is False:
            ev.append(f"bridge port {hop.dev} in {hop.netns_name}: hairpin_mode off")
            ev.append(f"the SYN was DNATed to the client itself ({backend[0]}:{backend[1]}) and "
                      f"had to leave by the port it came in on")  # fmt: skip
            return Finding(
                index, hop, "hairpin-mode-off",
                f"The pod called its own Service and was chosen as the backend; the bridge must "
                f"send the translated SYN back out of the port it came in on ({hop.dev}), which "
                f"it refuses when that port's hairpin mode is off, so it freed the frame.",
                tuple(ev),
                f"Turn hairpin mode on for the pods' bridge ports (CNI bridge plugin "
                f'"hairpinMode": true; kubelet --hairpin-mode=hairpin-veth; now: ip link set '
                f"{hop.dev} type bridge_slave hairpin on in {hop.netns_name}).",
            )  # fmt: skip

    if reason == "NETFILTER_DROP":
        found = _conntrack_drop(conn, index, pkt, hop, ev, ctx)
        if found is not None:
            return found
        rule = _rule_for(ctx, hop.netns)
        first = "SYN" if pkt.role == "SYN" else "request"
        if backend is None and pkt.role in ("SYN", "UDP") and _no_dnat_rules(ctx, hop.netns):
            ev.append(f"no DNAT applied to the {first}{after}; the Service has no DNAT rule in "
                      f"{hop.netns_name}'s NAT rules")  # fmt: skip
            ev += _rule_evidence(ctx, hop.netns)
            return Finding(
                index, hop, "service-no-endpoints",
                f"The Service {conn.key.dst}:{conn.key.dport} has no endpoints: kube-proxy wrote "
                f"no DNAT for it, only a rule that rejects its traffic, which dropped the {first} "
                f"in {hop.netns_name} (the client sees 'connection refused').",
                tuple(ev),
                "Give the Service ready endpoints: check its selector matches running pods and "
                "that their readiness probes pass (kubectl get endpointslices -l "
                "kubernetes.io/service-name=NAME).",
                rule.hook if rule else None, rule.rule if rule else None,
            )  # fmt: skip
        ev += _rule_evidence(ctx, hop.netns)
        hook = rule.hook if rule else None
        return Finding(
            index, hop, "dropped-by-rule",
            f"The {pkt.role} {hop.tuple} was dropped by a netfilter rule in {hop.netns_name}"
            f"{after}" + (f", in hook {hook}: {rule.rule}" if rule else "") + ".",
            tuple(ev),
            "Change the rule or policy named above (iptables-save -c / nft list ruleset in that "
            "namespace) so that Service traffic is accepted; kube-proxy's own rules accept it.",
            hook, rule.rule if rule else None,
        )  # fmt: skip

    values = ctx.names.sysctl_at(hop.netns, "net.ipv4.ip_forward", hop.ts_ns)
    forward = "0" if "0" in values else values[-1]
    routed = ctx.names.has_address(hop.netns, hop.tuple.dst) is False
    if forward == "0" and routed and hop.netns != client_ns:
        ev.append(f"net.ipv4.ip_forward = 0 in {hop.netns_name}, which does not own "
                  f"{hop.tuple.dst}: the packet had to be forwarded")  # fmt: skip
        return Finding(
            index, hop, "ip-forward-off",
            f"{hop.netns_name} does not forward IPv4 (net.ipv4.ip_forward=0): the {pkt.role} "
            f"had to be routed to {hop.tuple.dst} and was discarded ({reason}).",
            tuple(ev),
            f"Set net.ipv4.ip_forward=1 in {hop.netns_name} and persist it in /etc/sysctl.d/ "
            "(kubeadm's preflight checks it; something reset it).",
        )  # fmt: skip

    if ctx.names.kind(hop.netns, hop.dev) == "vxlan":
        ev.append(f"{hop.dev} is a VXLAN device: the overlay to the other node")
        return Finding(
            index, hop, "overlay-no-remote",
            f"The {pkt.role} to {hop.tuple.dst} was routed into the overlay device {hop.dev} "
            f"in {hop.netns_name}, which had no remote node to send it to ({reason}): its "
            "forwarding database lacks the destination node's VTEP entry.",
            tuple(ev),
            f"Check the overlay's entries in {hop.netns_name} (bridge fdb show dev {hop.dev}; "
            f"ip neigh show dev {hop.dev}); flanneld programs them from the node list: restart "
            "it or fix the node's flannel annotations.",
        )  # fmt: skip

    return Finding(
        index, hop, "packet-dropped",
        f"The {pkt.role} {hop.tuple} was dropped in {hop.netns_name} on {hop.dev} "
        f"(drop reason {reason}).",
        tuple(ev),
        "The drop reason names what the kernel objected to; look there (for NETFILTER_DROP "
        "the rules of that namespace, for TC_* the tc filters, for IP_* the routes).",
    )  # fmt: skip


def _conntrack_drop(
    conn: Connection, index: int, pkt: Packet, hop: Hop, ev: list[str], ctx: Context
) -> Finding | None:
    """A NETFILTER_DROP that conntrack itself made, told by the node's conntrack counters
    (read in the traced netns): a full table (no entry could be allocated: the packet
    has no entry and no netfilter hook after conntrack's saw it), or an entry that could
    not be confirmed (it passed SNAT with an unconfirmed entry, and insert_failed rose)."""
    stats = ctx.conntrack
    if stats is None or ctx.rule_drops_netns != hop.netns:
        return None
    before = pkt.hops[: pkt.hops.index(hop)]
    here = [h for h in before if h.netns == hop.netns]
    ns, role = hop.netns_name, pkt.role
    counts = (f"conntrack in {ns}: {stats.count} entries of nf_conntrack_max {stats.max}; "
              f"during the trace insert_failed rose by {stats.insert_failed}, drop by "
              f"{stats.drop}, early_drop by {stats.early_drop} (conntrack -S)")  # fmt: skip
    if hop.ct is None and not any(h.kind == "netfilter" for h in here) and stats.drop:
        if not stats.full:
            return None
        return Finding(
            index, hop, "conntrack-table-full",
            f"The conntrack table in {ns} is full ({stats.count} of {stats.max} entries): "
            f"conntrack could not allocate an entry for the {role} {hop.tuple} and dropped "
            "it at its own hook, before NAT and every rule (the kernel logs 'nf_conntrack: "
            "table full, dropping packet'). Every new connection through the node fails "
            "until entries expire.",
            (*ev, ("the packet carried no conntrack entry and reached no netfilter hook after "
             f"conntrack's in {ns}"), counts),
            "Raise net.netfilter.nf_conntrack_max (a global setting: in the host's netns; "
            "kube-proxy sets it from --conntrack-max-per-core) and nf_conntrack_buckets, or "
            "find what fills the table: conntrack -C, conntrack -L sorted by source; "
            "unanswered UDP entries live net.netfilter.nf_conntrack_udp_timeout (30 s).",
        )  # fmt: skip
    ct = hop.ct
    snat = next((h for h in reversed(here) if h.point == "nf:POSTROUTING@snat"
                 or h.kind == "conntrack"), None)  # fmt: skip
    if ct is not None and not ct.status & IPS_CONFIRMED and snat is not None:
        if not stats.insert_failed:
            return None
        return Finding(
            index, hop, "conntrack-insert-failed",
            f"conntrack could not confirm the entry of the {role} {ct.orig} in {ns}: its "
            f"reply tuple {ct.reply} is already another entry's (two flows NATed to the same "
            "tuple: SNAT to a single address and port, or two packets racing to create the "
            "same entry), so __nf_conntrack_confirm dropped the packet after SNAT "
            f"(insert_failed rose by {stats.insert_failed}).",
            (*ev, (f"the {role} left SNAT ({snat.point}) with an unconfirmed entry "
             f"({', '.join(ct.status_names) or 'no status'}): original {ct.orig}, reply "
             f"{ct.reply}"), counts),
            "Give SNAT room: a port range and --random-fully (kube-proxy's MASQUERADE), no "
            "fixed --to-source port; find the rule that maps several clients to one tuple "
            "(iptables-save -t nat / nft list ruleset). For the DNS race of glibc's parallel "
            "A/AAAA queries (kubernetes#56903): options single-request-reopen, or "
            "NodeLocal DNSCache.",
        )  # fmt: skip
    return None


def _no_dnat_rules(ctx: Context, ns: int) -> bool:
    rules = ctx.names.service_rules(ns)
    if rules is None:
        return False
    return not any("DNAT" in r or "dnat to" in r for r in rules)


def _reply_without_conntrack(
    conn: Connection,
    index: int,
    pkt: Packet,
    hop: Hop,
    missing: Hop,
    reason: str,
    ev: list[str],
    ctx: Context,
) -> Finding:
    ev.append(
        f"the {pkt.role} carried no conntrack entry at {missing.netns_name}/{missing.dev} "
        f"({missing.point}): conntrack classified it INVALID"
    )
    if conn.ct_ids:
        ids = ", ".join(f"{i:#x}" for i in sorted(conn.ct_ids))
        ev.append(f"the connection's entry ({ids}) was seen for its original direction before")
    rule = _rule_for(ctx, hop.netns) if reason == "NETFILTER_DROP" else None
    if reason == "NETFILTER_DROP":
        ev += _rule_evidence(ctx, hop.netns)
    return Finding(
        index, hop, "reply-without-conntrack",
        f"The {pkt.role} from the backend found no conntrack entry in {missing.netns_name} "
        f"(flushed, expired, evicted or looked up in another zone), so it could not be "
        f"reverse-translated and was INVALID; it was dropped at {hop.netns_name}/{hop.dev} "
        f"({reason}).",
        tuple(ev),
        NO_ENTRY_FIX,
        rule.hook if rule else None, rule.rule if rule else None,
    )  # fmt: skip


def refused(conn: Connection, client_ns: int | None) -> tuple[int, Packet] | None:
    """A reset sent by the backend (not the client) in answer to the SYN."""
    for i, pkt in enumerate(conn.packets):
        if pkt.role == "RST" and pkt.direction == "reply" and pkt.hops[0].netns != client_ns:
            return i, pkt
    return None
