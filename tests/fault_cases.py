"""Where each fault of the catalogue must be diagnosed: shared by the fixture tests
(recorded sessions) and the live tests (the lab on this kernel)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tracer.lab.faults import FAULTS, STALE_FLOW_SPORT


@dataclass(frozen=True)
class Where:
    """The break's packet, namespace, device (prefix), point, and what else it must name."""

    role: str
    netns: str
    dev: str  # a prefix: CNI names host veths vethXXXXXXXX
    point: str
    drop_reason: str | None = None
    hook: str | None = None
    rule_has: str | None = None
    evidence_has: str | None = None
    # a SYN routed to an address nothing answers: when the trace lasts until the kernel
    # gives up resolving its next hop (about 3 s), the SYN's path ends in that drop instead
    or_neigh_failed: bool = False
    or_role: str | None = None  # another role the break's packet may have


WHERE: dict[str, Where] = {
    "bridge-nf-off": Where("SYN+ACK", "ht-n1", "cni0", "net_dev_start_xmit",
                           evidence_has="bridge-nf-call-iptables = 0"),
    "no-br-netfilter": Where("SYN+ACK", "ht-n1", "cni0", "net_dev_start_xmit",
                             evidence_has="bridge-nf-call-iptables = absent"),
    "hairpin-off": Where("SYN", "ht-n1", "veth", "kfree_skb", "NOT_SPECIFIED",
                         evidence_has="hairpin_mode off"),
    "hairpin-no-masquerade": Where("SYN", "ht-n1-a", "eth0", "kfree_skb", "IP_LOCAL_SOURCE",
                                   evidence_has="client's own address"),
    "service-port-changed": Where("SYN", "ht-n1", "cni0", "nf:POSTROUTING@snat",
                                  evidence_has="the ports 8080/tcp, not 80/tcp",
                                  or_neigh_failed=True),
    "forward-drop": Where("SYN", "ht-n1", "veth", "kfree_skb", "NETFILTER_DROP", "FORWARD",
                          "policy DROP of chain FORWARD"),
    "no-endpoints": Where("SYN", "ht-n1", "cni0", "kfree_skb", "NETFILTER_DROP",
                          rule_has="has no endpoints"),
    "conntrack-miss": Where("SYN+ACK", "ht-n1", "veth", "kfree_skb", "NETFILTER_DROP",
                            "FORWARD", "--ctstate INVALID -j DROP", "INVALID"),
    "ip-forward-off": Where("SYN", "ht-n1", "cni0", "kfree_skb",
                            evidence_has="net.ipv4.ip_forward = 0"),
    "wrong-target-port": Where("RST", "ht-n1-b", "eth0", "net_dev_start_xmit",
                               evidence_has="NO_SOCKET"),
    "vxlan-fdb-missing": Where("SYN", "ht-n1", "flannel.1", "kfree_skb", "NO_TX_TARGET",
                               evidence_has="VXLAN"),
    "route-unreachable": Where("SYN", "ht-n1", "cni0", "kfree_skb"),
    "backend-blackhole": Where("SYN", "ht-n1-b", "eth0", "netif_receive_skb"),
    # over UDP (a dig to kube-dns): the reply, the request or the ICMP error that answered it
    "dns-bridge-nf-off": Where("UDP", "ht-n1", "cni0", "net_dev_start_xmit",
                               evidence_has="bridge-nf-call-iptables = 0"),
    "dns-no-endpoints": Where("UDP", "ht-n1", "cni0", "kfree_skb", "NETFILTER_DROP",
                              rule_has="has no endpoints",
                              evidence_has="ICMP port unreachable (type 3, code 3)"),
    "stale-conntrack-entry": Where("UDP", "ht-n1", "cni0", "nf:PREROUTING@dnat",
                                   evidence_has="100.96.54.247:53 is no endpoint there"),
    "conntrack-table-full": Where("UDP", "ht-n1", "cni0", "kfree_skb", "NETFILTER_DROP",
                                  evidence_has="of nf_conntrack_max"),
    "conntrack-insert-failed": Where("UDP", "ht-n1", "veth", "kfree_skb", "NETFILTER_DROP",
                                     evidence_has="with an unconfirmed entry"),
    # a full-sized segment of the response: with PSH or without (a role by the flags)
    "conntrack-insert-failed-tcp": Where("SYN", "ht-n1", "veth", "kfree_skb", "NETFILTER_DROP",
                                         evidence_has="with an unconfirmed entry"),
    "mtu-blackhole": Where("DATA", "ht-n2", "cni0", "kfree_skb", "PKT_TOO_BIG",
                           evidence_has="ICMP fragmentation-needed sent by 100.96.55.1",
                           or_role="ACK"),
    "dns-wrong-target-port": Where("ICMP", "ht-n1-b", "eth0", "net_dev_start_xmit",
                                   evidence_has="nothing listens on that port"),
}  # fmt: skip

HEALTHY = [name for name, f in FAULTS.items() if not f.cause]
BROKEN = [name for name, f in FAULTS.items() if f.cause]
NODE2 = ("100.96.55.10", "100.96.55.11")


def check_report(name: str, report: dict[str, Any]) -> None:
    """Assert the report diagnoses fault `name` as the catalogue says."""
    fault = FAULTS[name]
    conns = report["connections"]
    assert conns, f"{name}: no connection in the report"
    assert report["lost_events"] == 0
    proto = "tcp" if fault.client.startswith("curl") else "udp"
    assert {c["proto"] for c in conns} == {proto}, [c["proto"] for c in conns]
    if fault.client == "dig":  # one query (one try): one request, answered or not
        for c in conns:
            if c["client"]["port"] == STALE_FLOW_SPORT:
                continue  # a fault's own kept flow
            [x] = c["exchanges"]
            assert x["request"] == 0 and x["ok"] == (not fault.cause), x
    if not fault.cause:
        assert all(c["verdict"] == "ok" and c["break"] is None for c in conns), [
            (c["verdict"], c["break"] and c["break"]["cause"]) for c in conns
        ]
        if fault.self_service:
            check_self_call(conns)
        return
    broken = [c for c in conns if c["verdict"] == "broken"]
    assert broken, f"{name}: nothing broken: {[c['verdict'] for c in conns]}"
    if name == "vxlan-fdb-missing":  # only the connections sent to node 2 break
        for c in conns:
            to_node2 = c["backend"]["ip"] in NODE2
            assert (c["verdict"] == "broken") == to_node2, (c["backend"], c["verdict"])
    elif name.startswith("conntrack-insert-failed"):  # the kept flow holds the tuple
        for c in conns:
            kept = c["client"]["port"] == STALE_FLOW_SPORT
            # it works: a kept UDP flow ok, a TCP transfer begun before the trace incomplete
            assert (c["verdict"] != "broken") == kept, (c["client"], c["verdict"])
    else:
        assert len(broken) == len(conns)
    want = WHERE[name]
    for c in broken:
        b = c["break"]
        assert b["cause"] == fault.cause, (name, b["cause"], b["explanation"])
        if want.or_neigh_failed and b["drop_reason"] == "NEIGH_FAILED":
            assert (b["packet_role"], b["netns"], b["point"]) == (
                want.role,
                want.netns,
                "kfree_skb",
            )
            want = replace(want, dev="", point="kfree_skb")
        if want.or_role and b["packet_role"] == want.or_role:
            want = replace(want, role=want.or_role)
        assert (b["packet_role"], b["netns"], b["point"]) == (want.role, want.netns, want.point)
        assert b["dev"].startswith(want.dev), b["dev"]
        if want.drop_reason:
            assert b["drop_reason"] == want.drop_reason
        if want.hook:
            assert b["hook"] == want.hook
        if want.rule_has:
            assert want.rule_has in (b["rule"] or ""), b["rule"]
        if want.evidence_has:
            assert want.evidence_has in "\n".join(b["evidence"] + [b["explanation"]]), b["evidence"]
        assert b["fix"]


def check_self_call(conns: list[dict[str, Any]]) -> None:
    """A pod that called its own Service: its own pod is the backend, and the SYN+ACK it
    received (its last hop in the pod, after the hairpin) came from the Service address,
    while the same SYN+ACK left the pod from the pod's own address."""
    for c in conns:
        assert c["backend"]["ip"] == c["client"]["ip"], (c["client"], c["backend"])
        (sa,) = [p for p in c["packets"] if p["role"] == "SYN+ACK"]
        client_ns = c["packets"][0]["hops"][0]["netns"]
        in_client = [h for h in sa["hops"] if h["netns"] == client_ns]
        assert len(in_client) >= 2, sa["hops"]
        svc = f"{c['service']['ip']}:{c['service']['port']}"
        assert in_client[0]["src"] == f"{c['backend']['ip']}:{c['backend']['port']}"
        assert in_client[-1]["src"] == svc, in_client
