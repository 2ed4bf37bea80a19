"""The cluster lab's kube-proxy rules and fault specs, as text (no root)."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace

import pytest

from tracer.errors import UsageError
from tracer.lab import cluster, faults, seed
from tracer.lab.cluster import ClusterSpec, Endpoint


def _spec(n: int, **kw: object) -> ClusterSpec:
    eps = tuple(Endpoint(f"100.96.55.{10 + i}", 80) for i in range(n))
    return ClusterSpec(nodes=2, endpoints=eps, **kw)  # type: ignore[arg-type]


def test_endpoints_are_picked_by_statistic_rules_like_kube_proxy() -> None:
    text = cluster.iptables_rules(_spec(3))
    probs = re.findall(r"--probability (\S+) -j KUBE-SEP-", text)
    assert probs == ["0.3333333333", "0.5000000000"]
    svc_rules = [ln for ln in text.splitlines() if ln.startswith("-A KUBE-SVC-") and "->" in ln]
    assert len(svc_rules) == 3 + 2 and "statistic" not in svc_rules[2]  # and kube-dns's two
    assert text.count("-j DNAT --to-destination 100.96.55.") == 3
    export = [ln for ln in text.splitlines() if '"prod/export' in ln]
    assert sum("-j KUBE-MARK-MASQ" in ln for ln in export) == 1 + 3  # the SVC chain's, one per ep
    assert "has no endpoints" not in text
    assert "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP" in text


def test_no_endpoints_means_no_dnat_and_a_reject() -> None:
    text = cluster.iptables_rules(_spec(0, dns_endpoints=()))
    assert "DNAT" not in text and "KUBE-SVC-" not in text
    assert re.search(r'"prod/export has no endpoints" -m tcp --dport 80 -j REJECT', text)
    nft = cluster.nftables_rules(_spec(0, dns_endpoints=()))
    assert "dnat" not in nft and "elements = { 100.67.30.133 . tcp . 80 comment" in nft
    # kube-dns keeps its endpoint when only prod/export has none
    text = cluster.iptables_rules(_spec(0))
    assert "DNAT --to-destination 100.96.54.247:53" in text and "100.96.55." not in text


def test_nftables_numgen_over_all_endpoints() -> None:
    nft = cluster.nftables_rules(_spec(3))
    assert "numgen random mod 3 vmap { 0 : goto endpoint-" in nft
    assert nft.count("dnat to 100.96.55.") == 3


def test_the_hairpin_masquerade_fault_removes_only_the_endpoint_masquerade() -> None:
    spec = faults.get("hairpin-no-masquerade").spec("ht", "iptables")
    assert spec.endpoints == (Endpoint(spec.client.ip, 80),)
    text = cluster.iptables_rules(spec)
    assert f"-s {spec.client.ip}/32" not in text
    assert "! -s 100.96.0.0/11" in text  # the Service chain's own masquerade stays
    healthy = cluster.iptables_rules(faults.get("hairpin-off").spec("ht", "iptables"))
    assert f"-s {spec.client.ip}/32" in healthy


def test_fault_catalogue_shape() -> None:
    assert faults.get("vxlan-fdb-missing").spec("ht", "iptables").nodes == 2
    assert faults.get("none").spec("ht", "iptables", nodes=2).nodes == 2
    assert all(
        f.cause or f.name in ("none", "two-node", "self-call", "dns")
        for f in faults.FAULTS.values()
    )
    with pytest.raises(UsageError, match="unknown fault 'nope'"):
        faults.get("nope")
    with pytest.raises(UsageError):
        ClusterSpec(nodes=3)


def test_state_round_trip() -> None:
    state = cluster.ClusterState(_spec(2), ("ht-n1",), ("ht-n1-a",), {"ht-n1-a": "veth1"}, ("x",))
    assert cluster.ClusterState.from_json(state.to_json()) == state


# ------------------------------------------------------------------ kube-dns

# Chain names kube-proxy gave kube-system/kube-dns in real clusters (iptables-save of a
# kubeadm cluster with CoreDNS at 10.244.0.2): hash(ServicePortName + protocol [+ endpoint]).
REAL_DNS_CHAINS = {
    "udp": ("KUBE-SVC-TCOU7JCQXEZGVUNU", "KUBE-SEP-YIL6JZP7A3QYXJU2"),
    "tcp": ("KUBE-SVC-ERIFXISQEP7F7OF4", "KUBE-SEP-IT2ZTR26TO4XFPTO"),
}


def test_dns_chain_hashes_are_kube_proxys() -> None:
    spec = ClusterSpec(dns_endpoints=(Endpoint("10.244.0.2", 53),))
    ports = {
        sp.protocol: sp for sp in cluster.service_ports(spec) if sp.service == cluster.DNS_NAME
    }
    assert {p: sp.label for p, sp in ports.items()} == {
        "udp": "kube-system/kube-dns:dns",
        "tcp": "kube-system/kube-dns:dns-tcp",
    }
    for proto, (svc, sep) in REAL_DNS_CHAINS.items():
        assert ports[proto].iptables_chains() == (svc, [(sep, Endpoint("10.244.0.2", 53))])
    # kube-proxy's nftables proxier test: ns1/svc1 port p80 -> 10.180.0.1:80
    other = cluster.ServicePort("ns1/svc1", "p80", "tcp", "172.30.0.41", 80,
                                (Endpoint("10.180.0.1", 80),))  # fmt: skip
    assert other.nft_chains() == (
        "service-ULMVA6XW-ns1/svc1/tcp/p80",
        [("endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80", Endpoint("10.180.0.1", 80))],
    )


def test_dns_service_iptables_rules() -> None:
    spec = ClusterSpec(endpoints=cluster.default_endpoints(1))  # kube-dns default: n1-b:53
    text = cluster.iptables_rules(spec)
    lines = text.partition("*filter")[0].splitlines()
    for proto, label in (("udp", "dns"), ("tcp", "dns-tcp")):
        svc = "KUBE-SVC-" + seed._b32_sha256(f"kube-system/kube-dns:{label}{proto}")[:16]
        sep = "KUBE-SEP-" + seed._b32_sha256(
            f"kube-system/kube-dns:{label}{proto}100.96.54.247:53")[:16]  # fmt: skip
        c = f'-m comment --comment "kube-system/kube-dns:{label}'
        assert {f":{svc} - [0:0]", f":{sep} - [0:0]"} <= set(lines)
        want = [
            (
                f'-A KUBE-SERVICES -d 100.67.30.140/32 -p {proto} {c} cluster IP" -m {proto} '
                f"--dport 53 -j {svc}"
            ),
            (
                f'-A {svc} ! -s 100.96.0.0/11 -d 100.67.30.140/32 -p {proto} {c} cluster IP" '
                f"-m {proto} --dport 53 -j KUBE-MARK-MASQ"
            ),
            f'-A {svc} {c} -> 100.96.54.247:53" -j {sep}',
            f'-A {sep} -s 100.96.54.247/32 {c}" -j KUBE-MARK-MASQ',
            f'-A {sep} -p {proto} {c}" -m {proto} -j DNAT --to-destination 100.96.54.247:53',
        ]
        assert [ln for ln in lines if ln in want] == want, proto
    nodeports = next(i for i, ln in enumerate(lines) if "-j KUBE-NODEPORTS" in ln)
    portals = [i for i, ln in enumerate(lines) if ln.startswith("-A KUBE-SERVICES -d ")]
    assert len(portals) == 3 and max(portals) < nodeports  # the nodeports rule stays last
    assert "has no endpoints" not in text


def test_dns_service_without_endpoints_is_rejected() -> None:
    spec = ClusterSpec(endpoints=cluster.default_endpoints(1), dns_endpoints=())
    text = cluster.iptables_rules(spec)
    assert "kube-dns" not in text.partition("*filter")[0]  # no nat rule at all
    filt = text.partition("*filter")[2].splitlines()
    for proto, label in (("udp", "dns"), ("tcp", "dns-tcp")):
        assert (
            f"-A KUBE-SERVICES -d 100.67.30.140/32 -p {proto} -m comment --comment "
            f'"kube-system/kube-dns:{label} has no endpoints" -m {proto} --dport 53 -j REJECT '
            "--reject-with icmp-port-unreachable"
        ) in filt
    assert "DNAT --to-destination 100.96.54.247:80" in text  # prod/export untouched
    nft = cluster.nftables_rules(replace(spec, proxy_mode="nftables"))
    noep = nft.partition("map no-endpoint-services {")[2].partition("\n\t}")[0]
    assert (
        'elements = { 100.67.30.140 . udp . 53 comment "kube-system/kube-dns:dns" : goto '
        'reject-chain, 100.67.30.140 . tcp . 53 comment "kube-system/kube-dns:dns-tcp" : goto '
        "reject-chain }"
    ) in noep
    assert "kube-dns/" not in nft and "100.67.30.140 . udp . 53 : goto" not in nft


def test_dns_service_nftables_rules() -> None:
    nft = cluster.nftables_rules(ClusterSpec(proxy_mode="nftables"))
    svc_ips = nft.partition("map service-ips {")[2].partition("\n\t}")[0]
    for proto, label in (("udp", "dns"), ("tcp", "dns-tcp")):
        base = f"kube-system/kube-dns/{proto}/{label}"
        svc = f"service-{seed._b32_sha256(base)[:8]}-{base}"
        ep = (
            f"endpoint-{seed._b32_sha256(base + '__100.96.54.247/53')[:8]}-{base}__100.96.54.247/53"
        )
        assert f"100.67.30.140 . {proto} . 53 : goto {svc}" in svc_ips
        assert (
            f"\tchain {ep} {{\n\t\tip saddr 100.96.54.247 jump mark-for-masquerade\n"
            f"\t\tmeta l4proto {proto} dnat to 100.96.54.247:53\n\t}}"
        ) in nft
        assert (
            f"\tchain {svc} {{\n\t\tip daddr 100.67.30.140 {proto} dport 53 ip saddr != "
            f"100.96.0.0/11 jump mark-for-masquerade\n"
            f"\t\tnumgen random mod 1 vmap {{ 0 : goto {ep} }}\n\t}}"
        ) in nft
    # the udp chain of a real cluster's kube-dns (same hash whatever the cluster)
    assert "service-FY5PMXPG-kube-system/kube-dns/udp/dns" in svc_ips


def test_several_dns_endpoints_are_spread_like_the_http_ones() -> None:
    eps = (Endpoint("100.96.54.247", 53), Endpoint("100.96.55.10", 53))
    spec = ClusterSpec(nodes=2, dns_endpoints=eps)
    text = cluster.iptables_rules(spec)
    assert len(re.findall(r"kube-dns:dns -> \S+ -m statistic .* 0\.5000000000 ", text)) == 1
    assert text.count("-m udp -j DNAT --to-destination") == 2
    nft = cluster.nftables_rules(replace(spec, proxy_mode="nftables"))
    assert nft.count("numgen random mod 2 vmap") == 2  # dns and dns-tcp
    assert {p.ns for p in spec.dns_pods} == {"ht-n1-b", "ht-n2-c"}


def test_dns_pods_follow_the_dns_endpoints() -> None:
    assert [p.ns for p in ClusterSpec().dns_pods] == ["ht-n1-b"]
    assert ClusterSpec(dns_endpoints=()).dns_pods == ()
    client = ClusterSpec().client
    assert ClusterSpec(dns_endpoints=(Endpoint(client.ip, 53),)).dns_pods == (client,)
    assert ClusterSpec(dns_endpoints=(Endpoint("100.96.54.99", 53),)).dns_pods == ()


@pytest.mark.parametrize(
    "dns_eps", [None, (), (Endpoint("100.96.54.240", 53), Endpoint("100.96.55.11", 5353))]
)
def test_spec_round_trip_keeps_the_dns_endpoints(dns_eps: tuple[Endpoint, ...] | None) -> None:
    spec = _spec(2, dns_endpoints=dns_eps)
    d = json.loads(json.dumps(spec.to_dict()))
    assert ClusterSpec.from_dict(d) == spec
    assert d["dns_endpoints"] == (None if dns_eps is None else [str(e) for e in dns_eps])
    del d["dns_endpoints"]  # a state file written before kube-dns existed
    assert ClusterSpec.from_dict(d).dns_endpoints is None


@pytest.mark.needs_root
@pytest.mark.needs_binary("unshare", "iptables-restore", "nft")
@pytest.mark.parametrize("mode", ["iptables", "nftables"])
@pytest.mark.parametrize(
    ("http", "dns_eps"),
    [(1, None), (0, ()), (3, (Endpoint("100.96.54.247", 53), Endpoint("100.96.55.10", 53)))],
)
def test_the_kernel_accepts_the_rules(
    mode: str, http: int, dns_eps: tuple[Endpoint, ...] | None
) -> None:
    """iptables-restore --test / nft -c, in a throwaway netns (unshare), never the caller's."""
    spec = _spec(http, proxy_mode=mode, dns_endpoints=dns_eps)
    if mode == "iptables":
        argv, text = ["iptables-restore", "--test"], cluster.iptables_rules(spec)
    else:
        argv, text = ["nft", "-c", "-f", "-"], cluster.nftables_rules(spec)
    proc = subprocess.run(["unshare", "--net", *argv], input=text, capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
