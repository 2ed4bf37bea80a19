"""Reassembly and diagnosis on recorded sessions of the seed case (no root, no kernel)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.fixtures.loader import Fixture, load
from tracer.analysis import analyse
from tracer.analysis.context import Context
from tracer.events.model import Event, Point
from tracer.topology import Topology


@pytest.fixture(scope="module")
def broken() -> Fixture:
    return load("seed-broken.json")


@pytest.fixture(scope="module")
def healthy() -> Fixture:
    return load("seed-healthy.json")


def _with_sysctl(topo: Topology, ns_name: str, key: str, value: str | None) -> Topology:
    namespaces = []
    for ns in topo.namespaces:
        if ns.name == ns_name:
            sysctls = dict(ns.sysctls)
            sysctls[key] = value
            ns = replace(ns, sysctls=sysctls)
        namespaces.append(ns)
    return replace(topo, namespaces=tuple(namespaces))


def _one(fx: Fixture, ctx: Context | None = None):  # type: ignore[no-untyped-def]
    results = analyse(fx.events, ctx or fx.context())
    assert len(results) == 1, [str(c.key) for c, _ in results]
    return results[0]


def test_seed_broken_is_diagnosed_on_the_syn_ack_in_the_node(broken: Fixture) -> None:
    conn, diag = _one(broken)
    assert (conn.key.src, conn.key.dst, conn.key.dport) == ("100.96.54.240", "100.67.30.133", 80)
    assert conn.backend == ("100.96.54.247", 80)
    assert diag.verdict == "broken"
    b = diag.brk
    assert b is not None
    assert (b.packet_role, b.netns, b.dev, b.cause) == (
        "SYN+ACK",
        "node",
        "cni0",
        "bridge-nf-call-iptables-off",
    )
    assert b.point == "net_dev_start_xmit"
    assert "bridge-nf-call-iptables=1" in b.fix
    joined = "\n".join(b.evidence)
    assert "DNAT 100.67.30.133:80 -> 100.96.54.247:80" in joined
    assert "net.bridge.bridge-nf-call-iptables = 0 in netns node" in joined
    assert "received the SYN+ACK from 100.96.54.247:80" in joined
    assert "answered with RST" in joined


def test_seed_broken_packets_roles_hops_and_rst_link(broken: Fixture) -> None:
    conn, _ = _one(broken)
    roles = [p.role for p in conn.packets]
    assert roles[:3] == ["SYN", "SYN+ACK", "RST"]
    assert roles.count("SYN") >= 2, "curl's kernel retransmits the SYN within 3 s"
    syn, synack, rst = conn.packets[:3]
    assert (syn.direction, synack.direction, rst.direction) == ("original", "reply", "original")
    # The SYN is DNATed in the node netns by the PREROUTING nat stage.
    nat_hops = [h for h in syn.hops if h.nat]
    assert nat_hops and nat_hops[0].netns_name == "node"
    assert nat_hops[0].point == "nf:PREROUTING@dnat"
    assert nat_hops[0].ct is not None and nat_hops[0].ct.dnat
    # The SYN+ACK crosses the node only at device level: no netfilter point.
    node_hops = [h for h in synack.hops if h.netns_name == "node"]
    assert [h.kind for h in node_hops] == ["dev_rx", "dev_tx"]
    assert all(h.tuple.src == "100.96.54.247" for h in synack.hops)
    # pod A answers it with a reset; the RST is linked to that SYN+ACK.
    assert any(h.kind == "reset" and h.netns_name == "poda" for h in synack.hops)
    assert rst.caused_by == 1
    assert rst.hops[0].netns_name == "poda"


def test_healthy_is_ok_and_reply_is_reverse_translated(healthy: Fixture) -> None:
    conn, diag = _one(healthy)
    assert diag.verdict == "ok" and diag.brk is None
    synack = next(p for p in conn.packets if p.role == "SYN+ACK")
    snat = [h for h in synack.hops if h.nat and "SNAT" in h.nat]
    assert snat and snat[0].netns_name == "node"
    assert "100.96.54.247:80 -> 100.67.30.133:80" in (snat[0].nat or "")
    delivered = [h for h in synack.hops if h.netns_name == "poda"]
    assert delivered and delivered[0].tuple.src == "100.67.30.133"


def test_missing_sysctl_means_br_netfilter_not_loaded(broken: Fixture) -> None:
    topo = _with_sysctl(broken.topology, "node", "net.bridge.bridge-nf-call-iptables", None)
    fx = replace(broken, topology=topo)
    _, diag = _one(fx)
    assert diag.brk is not None and diag.brk.cause == "br-netfilter-not-loaded"
    assert "modprobe br_netfilter" in diag.brk.fix


def test_bridged_with_sysctl_on_is_unexplained_not_guessed(broken: Fixture) -> None:
    topo = _with_sysctl(broken.topology, "node", "net.bridge.bridge-nf-call-iptables", "1")
    _, diag = _one(replace(broken, topology=topo))
    assert diag.verdict == "broken"
    assert diag.brk is not None and diag.brk.cause == "unexplained"


def test_lost_events_make_the_connection_incomplete(broken: Fixture) -> None:
    t = broken.events[len(broken.events) // 2].ts_ns
    _, diag = _one(broken, broken.context(loss_windows=((t, t + 1),)))
    assert diag.verdict == "incomplete"
    assert any("lost" in n for n in diag.notes)


def test_trace_cut_right_after_the_syn_is_incomplete(broken: Fixture) -> None:
    first_synack = next(i for i, e in enumerate(broken.events) if e.tcp_flags & 0x12 == 0x12)
    events = broken.events[:first_synack]
    ctx = broken.context(end_ns=events[-1].ts_ns + 1000)
    conn, diag = analyse(events, ctx)[0]
    assert [p.role for p in conn.packets] == ["SYN"]
    assert diag.verdict == "incomplete" and diag.brk is None


def test_unanswered_syn_after_timeout_is_unexplained_with_last_place(broken: Fixture) -> None:
    first_synack = next(i for i, e in enumerate(broken.events) if e.tcp_flags & 0x12 == 0x12)
    events = broken.events[:first_synack]
    ctx = broken.context(end_ns=events[-1].ts_ns + 5_000_000_000)
    _, diag = analyse(events, ctx)[0]
    assert diag.verdict == "broken"
    assert diag.brk is not None and diag.brk.cause == "unexplained"
    assert (diag.brk.netns, diag.brk.dev) == ("podb", "eth0")


@pytest.mark.parametrize(("reason", "cause"), [(12, "dropped-by-rule"), (2, "packet-dropped")])
def test_a_drop_on_the_path_is_reported_with_its_reason(
    broken: Fixture, reason: int, cause: str
) -> None:
    first_synack = next(i for i, e in enumerate(broken.events) if e.tcp_flags & 0x12 == 0x12)
    syn_events = broken.events[:first_synack]
    last = syn_events[-1]  # the SYN arriving in podb
    dropped = replace(last, point=Point.DROP, reason=reason, ts_ns=last.ts_ns + 1)
    ctx = broken.context(end_ns=last.ts_ns + 5_000_000_000)
    _, diag = analyse(syn_events + [dropped], ctx)[0]
    assert diag.verdict == "broken"
    assert diag.brk is not None and diag.brk.cause == cause
    name = ctx.drop_reasons[reason]
    assert diag.brk.drop_reason == name
    assert (diag.brk.netns, diag.brk.dev, diag.brk.point) == ("podb", "eth0", "kfree_skb")
    assert name in diag.brk.explanation or name in "\n".join(diag.brk.evidence)


def _healthy_after_broken(broken: Fixture, healthy: Fixture, *, same_isn: bool) -> list[Event]:
    """The broken fixture's attempt, then the healthy exchange moved onto the same 4-tuple
    (rewritten): with same_isn, as a retransmission of the broken handshake (the client's
    sequence numbers shifted onto the broken SYN's); else as a new socket on that port."""
    b_conn, _ = _one(broken)
    h_conn, _ = _one(healthy)
    port = b_conn.key.sport
    port_map = {h_conn.key.sport: port}
    shift = max(e.ts_ns for e in broken.events) + 1 - min(e.ts_ns for e in healthy.events)
    assert b_conn.isn is not None and h_conn.isn is not None
    delta = (b_conn.isn - h_conn.isn) % (1 << 32) if same_isn else 0

    def moved(ev):  # type: ignore[no-untyped-def]
        t = ev.tuple
        t = replace(t, sport=port_map.get(t.sport, t.sport), dport=port_map.get(t.dport, t.dport))
        seq, ack = ev.seq, ev.ack_seq
        if t.sport == port:
            seq = (seq + delta) % (1 << 32)
        elif t.dport == port and ev.tcp_flags & 0x10:
            ack = (ack + delta) % (1 << 32)
        ct = ev.ct
        if ct is not None:
            o, r = ct.orig, ct.reply
            ct = replace(
                ct,
                orig=replace(o, sport=port_map.get(o.sport, o.sport)),
                reply=replace(r, dport=port_map.get(r.dport, r.dport)),
            )
        return replace(ev, tuple=t, ct=ct, ts_ns=ev.ts_ns + shift, seq=seq, ack_seq=ack)

    return broken.events + [moved(e) for e in healthy.events]


def test_recovered_when_a_retransmitted_syn_succeeds(broken: Fixture, healthy: Fixture) -> None:
    """The same handshake (same ISN) broke, then completed: one connection, recovered."""
    events = _healthy_after_broken(broken, healthy, same_isn=True)
    ctx = broken.context(end_ns=max(e.ts_ns for e in events) + 1)
    results = analyse(events, ctx)
    assert len(results) == 1
    conn, diag = results[0]
    assert diag.verdict == "recovered"
    assert diag.brk is not None and diag.brk.cause == "bridge-nf-call-iptables-off"
    assert conn.isn == _one(broken)[0].isn and not conn.first_seen_mid_connection


def test_a_new_handshake_on_a_reused_port_is_a_new_connection(
    broken: Fixture, healthy: Fixture
) -> None:
    """A broken attempt, then a new socket on the same port (a new ISN): two connections,
    broken then ok, each with its own ISN."""
    events = _healthy_after_broken(broken, healthy, same_isn=False)
    ctx = broken.context(end_ns=max(e.ts_ns for e in events) + 1)
    results = analyse(events, ctx)
    assert [d.verdict for _c, d in results] == ["broken", "ok"]
    (first, d1), (second, _d2) = results
    assert first.key == second.key
    assert d1.brk is not None and d1.brk.cause == "bridge-nf-call-iptables-off"
    assert (first.isn, second.isn) == (_one(broken)[0].isn, _one(healthy)[0].isn)
    assert first.last_ns < second.first_ns


def test_conntrack_function_point_counts_as_netfilter(broken: Fixture) -> None:
    """A SYN+ACK seen by nf_conntrack_in (fentry/kprobe) did not bypass netfilter."""
    synack = next(e for e in broken.events if e.tcp_flags & 0x12 == 0x12 and e.dev == "veth-podb")
    seen = replace(synack, point=Point.CT_IN, ts_ns=synack.ts_ns + 1)
    _, diag = analyse([*broken.events, seen], broken.context())[0]
    assert diag.brk is not None and diag.brk.cause != "bridge-nf-call-iptables-off"


def test_br_nf_pre_routing_alone_is_not_netfilter(broken: Fixture) -> None:
    """br_nf_pre_routing is entered with the sysctl off too: still the seed cause."""
    synack = next(e for e in broken.events if e.tcp_flags & 0x12 == 0x12 and e.dev == "veth-podb")
    seen = replace(synack, point=Point.BR_NF_PRE_ROUTING, ts_ns=synack.ts_ns + 1)
    _, diag = analyse([*broken.events, seen], broken.context())[0]
    assert diag.brk is not None and diag.brk.cause == "bridge-nf-call-iptables-off"
    assert any("br_nf_pre_routing was entered" in e for e in diag.brk.evidence)


def test_break_names_the_bridge_ports_crossed(broken: Fixture) -> None:
    _, diag = _one(broken)
    assert diag.brk is not None and diag.brk.via == ("veth-podb", "veth-poda")


def test_scope_is_the_node_and_its_veth_joined_pods(broken: Fixture) -> None:
    from tracer.analysis.context import node_scope, scope_fields

    node = broken.topology.find_by_name("node")
    assert node is not None
    scope = node_scope(broken.topology, node.inode)
    assert scope is not None
    assert {broken.topology.ns_name(i) for i in scope} == {"node", "poda", "podb"}
    stranger = replace(broken.events[0], netns=1)  # same tuple, a namespace of another lab
    events = [*broken.events, stranger]
    from tracer.analysis.stream import StreamAnalyser
    from tracer.events.codec import encode
    from tracer.events.rows import CODEC, rows_of

    engine = StreamAnalyser(broken.context(scope=scope), CODEC)
    engine.feed(rows_of(b"".join(map(encode, events))))
    engine.finish()
    fields = scope_fields(engine.events_out_of_scope, broken.topology, scope)
    assert fields == {"scope": ("node", "poda", "podb"), "events_out_of_scope": 1}
    scoped = analyse(events, broken.context(scope=scope))
    unscoped = analyse(events, broken.context())
    baseline = analyse(broken.events, broken.context())

    def hops(results):  # type: ignore[no-untyped-def]
        return sum(len(p.hops) for c, _ in results for p in c.packets)

    assert hops(scoped) == hops(baseline)
    assert hops(unscoped) == hops(baseline) + 1, "the stranger merges into the connection"


def test_a_bridged_break_is_said_as_bridged_between_its_ports(broken: Fixture) -> None:
    """Issue 17.8: the seed break names cni0, on which the SYN+ACK has no hop: the text says
    it was bridged by cni0 from one port to the other."""
    _conn, diag = _one(broken)
    b = diag.brk
    assert b is not None and b.dev == "cni0" and "cni0" not in b.via
    assert b.where == (
        "SYN+ACK bridged by node/cni0 from veth-podb to veth-poda (last seen at net_dev_start_xmit)"
    )
    plain = replace(b, dev="veth-podb", via=("veth-podb",))
    assert plain.where == "SYN+ACK at node/veth-podb (net_dev_start_xmit)"
