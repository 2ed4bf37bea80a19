"""Which Services kube-proxy's rules define (tracer.topology.services): pure text, no root."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tracer.errors import UsageError
from tracer.lab import cluster
from tracer.lab.cluster import ClusterSpec
from tracer.topology.model import ServiceEntry
from tracer.topology.services import (
    kube_services,
    nearest,
    node_view,
    resolve_name,
    service_entries,
    service_warning,
)

ROOT = Path(__file__).resolve().parents[2]
SVC = "100.67.30.133"
DNS = {"100.67.30.140": frozenset({"53/udp", "53/tcp"})}  # the labs' kube-dns


def _seed_lab_nat() -> str:
    """The nat table scripts/seed-lab.sh loads (kube-proxy's iptables shape)."""
    script = ROOT / "scripts" / "seed-lab.sh"
    out = subprocess.run(
        ["bash", "-c", f'source <(sed "s/^main \\"\\$@\\"$//" {script}); nat_rules'],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout


def test_iptables_cluster_ip_rules_give_the_address_and_port() -> None:
    services = kube_services(_seed_lab_nat(), "")
    assert services == {SVC: frozenset({"80/tcp"}), **DNS}


def test_a_service_without_endpoints_is_a_filter_table_reject() -> None:
    filt = (
        "*filter\n:KUBE-SERVICES - [0:0]\n"
        '-A KUBE-SERVICES -d 10.96.0.99/32 -p udp -m comment --comment "kube-system/dns:dns '
        'has no endpoints" -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable\n'
        "COMMIT\n"
    )
    services = kube_services(_seed_lab_nat() + filt, "")
    assert services is not None
    assert services["10.96.0.99"] == frozenset({"53/udp"})
    assert services[SVC] == frozenset({"80/tcp"})


def test_no_kube_proxy_rules_means_nothing_known() -> None:
    plain = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -d 10.0.0.1/32 -j DNAT --to 1.2.3.4\n"
    assert kube_services(plain, "") is None
    assert kube_services("", "table ip filter {\n}\n") is None


def test_kube_proxy_rules_without_the_address_say_so() -> None:
    services = kube_services(_seed_lab_nat(), "")
    assert services is not None and "10.96.0.99" not in services


def test_nftables_maps_of_the_kube_proxy_table() -> None:
    text = cluster.nftables_rules(ClusterSpec(prefix="ht", nodes=1, proxy_mode="nftables"))
    assert kube_services("", text) == {SVC: frozenset({"80/tcp"}), **DNS}
    other = text.replace("table ip kube-proxy", "table ip not-kube-proxy")
    assert kube_services("", other) is None


def test_iptables_rules_of_the_cluster_lab_with_and_without_endpoints() -> None:
    spec = ClusterSpec(prefix="ht", nodes=1)
    want = {SVC: frozenset({"80/tcp"}), **DNS}
    assert kube_services(cluster.iptables_rules(spec), "") == want
    none = replace(spec, endpoints=(), dns_endpoints=())
    assert kube_services(cluster.iptables_rules(none), "") == want
    nft_none = cluster.nftables_rules(replace(none, proxy_mode="nftables"))
    assert kube_services("", nft_none) == want


def test_nft_elements_outside_the_kube_proxy_table_do_not_count() -> None:
    text = (
        "table ip mine {\n\tmap m {\n\t\telements = { 10.1.1.1 . tcp . 22 : accept }\n\t}\n}\n"
        "table ip kube-proxy {\n\tmap service-ips {\n\t\telements = { 10.96.0.1 . tcp . 443 "
        ": goto service-x, 10.96.0.10 . udp . 53 : goto service-y }\n\t}\n}\n"
    )
    assert kube_services("", text) == {
        "10.96.0.1": frozenset({"443/tcp"}),
        "10.96.0.10": frozenset({"53/udp"}),
    }


def test_nearest_addresses_and_the_warnings() -> None:
    services = {a: frozenset({"80/tcp"}) for a in ("10.96.0.1", "10.96.0.10", "10.96.5.5")}
    assert nearest(services, "10.96.0.9", 2) == ("10.96.0.10", "10.96.0.1")
    assert service_warning(SVC, 80, ("80/tcp",), (), "node") is None
    assert service_warning(SVC, 0, ("80/tcp",), (), "node") is None
    assert service_warning(SVC, 80, None, (), "node") is None, "unknown: nothing said"
    w = service_warning(SVC, 81, ("80/tcp", "443/tcp"), (), "node")
    assert w == (
        "kube-proxy's rules in netns node have no port 81/tcp for Service 100.67.30.133 "
        "(its ports: 80/tcp, 443/tcp)"
    )
    # both protocols traced (--svc without /PROTO): either one of the Service's is enough
    both = ("tcp", "udp")
    assert service_warning("10.96.0.10", 53, ("53/udp",), (), "node", both) is None
    assert service_warning("10.96.0.10", 53, ("53/udp",), (), "node", ("tcp",)) is not None
    w = service_warning(SVC, 81, ("80/tcp",), (), "node", both)
    assert w is not None and "no port 81/tcp or 81/udp for Service" in w
    w = service_warning("10.96.0.99", 0, (), ("10.96.0.10",), "node")
    assert w is not None and "no Service with the address 10.96.0.99" in w
    assert "10.96.0.10" in w


def test_the_nodes_own_address_is_nodeport_traffic_nothing_is_said() -> None:
    from tracer.topology.collect import NatRules, for_own_addresses
    from tracer.topology.model import Interface

    nat = NatRules((), None, (), ("100.67.30.133",))
    eth0 = Interface(2, "eth0", addresses=("192.0.2.10/24",))
    assert for_own_addresses(nat, [eth0], "192.0.2.10").service_ports is None
    assert for_own_addresses(nat, [eth0], "192.0.2.11").service_ports == ()


# --- Services by name (issue 14.1) -------------------------------------------------------

# kube-proxy's iptables shape as iptables-save prints it, for a two-port Service with two
# endpoints, its external IP, an unnamed port in the older "ns/name: cluster IP" comment, and
# (filter table) a Service without endpoints
KUBE_IPTABLES = """*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p443 cluster IP" -m tcp --dport 443 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SERVICES -d 1.2.3.4/32 -p tcp -m comment --comment "ns1/svc1:p80 external IP" -m tcp --dport 80 -j KUBE-EXT-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2: cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -m tcp -j DNAT --to-destination 10.180.0.1:8443
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -j KUBE-SEP-CCCCCCCCCCCCCCCC
-A KUBE-SEP-CCCCCCCCCCCCCCCC -p tcp -m tcp -j DNAT --to-destination 10.180.0.3:8080
COMMIT
*filter
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 172.30.0.43/32 -p udp -m comment --comment "ns3/svc3:dns has no endpoints" -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""


def _entries(ipt: str = "", nft: str = "") -> tuple[ServiceEntry, ...]:
    entries = service_entries(ipt, nft)
    assert entries is not None
    return entries


def test_iptables_comments_name_each_port_and_its_chains_give_the_endpoints() -> None:
    got = {(e.ip, e.port, e.proto, e.kind): e for e in _entries(KUBE_IPTABLES)}
    p80 = got["172.30.0.41", 80, "tcp", "cluster IP"]
    assert (p80.name, p80.port_name) == ("ns1/svc1", "p80")
    assert p80.endpoints == ("10.180.0.1:80", "10.180.0.2:80"), "in the rules' order"
    p443 = got["172.30.0.41", 443, "tcp", "cluster IP"]
    assert (p443.name, p443.port_name, p443.endpoints) == ("ns1/svc1", "p443", ("10.180.0.1:8443",))
    ext = got["1.2.3.4", 80, "tcp", "external IP"]
    assert ext.name == "ns1/svc1" and ext.endpoints == (), "its KUBE-EXT chain is not in the text"
    old = got["172.30.0.42", 8080, "tcp", "cluster IP"]
    assert (old.name, old.port_name, old.endpoints) == ("ns2/svc2", "", ("10.180.0.3:8080",))
    rejected = got["172.30.0.43", 53, "udp", "cluster IP"]
    assert (rejected.name, rejected.port_name, rejected.endpoints) == ("ns3/svc3", "dns", ())
    assert len(got) == 5


def test_hand_written_rules_without_comments_have_no_name() -> None:
    text = (
        "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 10.96.0.5/32 -p tcp -m tcp "
        "--dport 80 -j KUBE-SVC-X\n-A KUBE-SVC-X -j DNAT --to-destination 10.1.1.1:80\n"
    )
    [e] = _entries(text)
    assert (e.ip, e.port, e.name, e.port_name) == ("10.96.0.5", 80, None, "")
    assert e.endpoints == ("10.1.1.1:80",)


def test_the_cluster_labs_rules_name_their_services_in_both_modes() -> None:
    spec = ClusterSpec(prefix="ht", nodes=2, endpoints=cluster.default_endpoints(2))
    eps = tuple(str(e) for e in spec.endpoints)
    want = {
        (SVC, 80, "tcp", "prod/export", "", eps),
        ("100.67.30.140", 53, "udp", "kube-system/kube-dns", "dns", ("100.96.54.247:53",)),
        ("100.67.30.140", 53, "tcp", "kube-system/kube-dns", "dns-tcp", ("100.96.54.247:53",)),
    }
    for mode in ("iptables", "nftables"):
        s = replace(spec, proxy_mode=mode)
        text = cluster.iptables_rules(s) if mode == "iptables" else cluster.nftables_rules(s)
        got = _entries(text) if mode == "iptables" else _entries(nft=text)
        assert {(e.ip, e.port, e.proto, e.name, e.port_name, e.endpoints) for e in got} == want
        empty = replace(s, dns_endpoints=())  # kube-proxy's REJECT / no-endpoint-services
        text = (
            cluster.iptables_rules(empty) if mode == "iptables" else cluster.nftables_rules(empty)
        )
        got = _entries(text) if mode == "iptables" else _entries(nft=text)
        dns = {(e.proto, e.name, e.port_name, e.endpoints) for e in got if e.port == 53}
        assert dns == {("udp", "kube-system/kube-dns", "dns", ()),
                       ("tcp", "kube-system/kube-dns", "dns-tcp", ())}, mode  # fmt: skip


def test_kube_proxys_nftables_chain_names_give_name_port_name_and_endpoints() -> None:
    text = """table ip kube-proxy {
	chain service-ULMVA6XW-ns1/svc1/tcp/p80 {
		ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
		numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80, 1 : goto endpoint-AAAAAAAA-ns1/svc1/tcp/p80__10.180.0.2/80 }
	}
	chain endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 {
		ip saddr 10.180.0.1 jump mark-for-masquerade
		meta l4proto tcp dnat to 10.180.0.1:80
	}
	chain endpoint-AAAAAAAA-ns1/svc1/tcp/p80__10.180.0.2/80 {
		meta l4proto tcp dnat to 10.180.0.2:80
	}
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80,
			     192.168.99.22 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/ }
	}
	map no-endpoint-services {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 172.30.0.45 . udp . 53 comment "ns5/svc5:dns" : goto reject-chain }
	}
}
"""
    got = {(e.ip, e.port, e.proto): e for e in _entries(nft=text)}
    svc1 = got["172.30.0.41", 80, "tcp"]
    assert (svc1.name, svc1.port_name, svc1.kind) == ("ns1/svc1", "p80", "cluster IP")
    assert svc1.endpoints == ("10.180.0.1:80", "10.180.0.2:80")
    ext = got["192.168.99.22", 80, "tcp"]
    assert (ext.name, ext.port_name, ext.kind) == ("ns2/svc2", "", "external IP")
    none = got["172.30.0.45", 53, "udp"]
    assert (none.name, none.port_name, none.endpoints) == ("ns5/svc5", "dns", ())


def test_a_service_name_resolves_to_its_address_ports_and_protocols() -> None:
    entries = _entries(KUBE_IPTABLES) + _entries(
        nft=cluster.nftables_rules(ClusterSpec(prefix="ht", nodes=1, proxy_mode="nftables"))
    )
    both = ("tcp", "udp")
    assert resolve_name(entries, "ns1/svc1", 0, None, both, "n") == ("172.30.0.41", 0, ("tcp",))
    assert resolve_name(entries, "ns1/svc1", 443, None, both, "n") == ("172.30.0.41", 443, ("tcp",))
    assert resolve_name(entries, "ns1/svc1", 0, "p80", both, "n") == ("172.30.0.41", 80, ("tcp",))
    assert resolve_name(entries, "prod/export", 0, None, both, "n") == (SVC, 80, ("tcp",))
    dns = "kube-system/kube-dns"
    assert resolve_name(entries, dns, 0, None, both, "n") == ("100.67.30.140", 53, both)
    assert resolve_name(entries, dns, 0, "dns", both, "n") == ("100.67.30.140", 53, ("udp",))
    assert resolve_name(entries, dns, 53, None, ("tcp",), "n") == ("100.67.30.140", 53, ("tcp",))


def test_an_unknown_service_name_is_a_usage_error_with_close_matches() -> None:
    entries = _entries(KUBE_IPTABLES) + _entries(
        nft=cluster.nftables_rules(ClusterSpec(prefix="ht", nodes=1, proxy_mode="nftables"))
    )
    with pytest.raises(UsageError, match=r"no Service prod/exprot in kube-proxy's rules in "
                       r"netns node; close matches: prod/export$"):  # fmt: skip
        resolve_name(entries, "prod/exprot", 0, None, ("tcp",), "node")
    with pytest.raises(UsageError, match="close matches: prod/export"):  # other namespace
        resolve_name(entries, "default/export", 0, None, ("tcp",), "node")
    with pytest.raises(UsageError, match=r"Service prod/export has no port 81 .*its ports: 80/tcp"):
        resolve_name(entries, "prod/export", 81, None, ("tcp", "udp"), "node")
    with pytest.raises(
        UsageError, match=r"has no port http/tcp .*its ports: p443 443/tcp, p80 80/tcp"
    ):
        resolve_name(entries, "ns1/svc1", 0, "http", ("tcp",), "node")
    with pytest.raises(UsageError, match=r"has no port dns/tcp .*dns 53/udp, dns-tcp 53/tcp"):
        resolve_name(entries, "kube-system/kube-dns", 0, "dns", ("tcp",), "node")
    with pytest.raises(
        UsageError, match="no kube-proxy rules .* in netns node; give its ClusterIP"
    ):
        resolve_name(None, "prod/export", 0, None, ("tcp",), "node")


def test_the_node_view_names_the_traced_address_from_the_snapshot() -> None:
    from tracer.topology.model import Namespace, Topology

    entries = _entries(KUBE_IPTABLES)
    mine = tuple(e for e in entries if e.ip == "172.30.0.41")
    ns = Namespace(7, "node", service_ports=("80/tcp", "443/tcp"), service_entries=mine)
    topo = Topology.from_dict(Topology((ns,), 0.0).to_dict())  # as a session holds it
    view = node_view(topo, 7, "172.30.0.41", 80, ("tcp", "udp"))
    assert (view.name, view.port_name, view.warnings) == ("ns1/svc1", "p80", ())
    assert view.endpoints == (("10.180.0.1", 80, "tcp"), ("10.180.0.2", 80, "tcp"))
    every = node_view(topo, 7, "172.30.0.41", 0, ("tcp",))
    assert (every.name, every.port_name) == ("ns1/svc1", None), "two ports: no one port name"
    assert every.endpoints is not None and len(every.endpoints) == 3
    older = Namespace(7, "node", service_ports=("80/tcp",))  # a session from before names
    old = node_view(Topology((older,), 0.0), 7, "172.30.0.41", 80, ("tcp",))
    assert (old.name, old.port_name, old.endpoints) == (None, None, None)
