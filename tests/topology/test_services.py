"""Which Services kube-proxy's rules define (tracer.topology.services): pure text, no root."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

from tracer.lab import cluster
from tracer.lab.cluster import ClusterSpec
from tracer.topology.services import kube_services, nearest, service_warning

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
