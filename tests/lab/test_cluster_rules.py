"""The cluster lab's kube-proxy rules and fault specs, as text (no root)."""

from __future__ import annotations

import re

import pytest

from tracer.errors import UsageError
from tracer.lab import cluster, faults
from tracer.lab.cluster import ClusterSpec, Endpoint


def _spec(n: int, **kw: object) -> ClusterSpec:
    eps = tuple(Endpoint(f"100.96.55.{10 + i}", 80) for i in range(n))
    return ClusterSpec(nodes=2, endpoints=eps, **kw)  # type: ignore[arg-type]


def test_endpoints_are_picked_by_statistic_rules_like_kube_proxy() -> None:
    text = cluster.iptables_rules(_spec(3))
    probs = re.findall(r"--probability (\S+) -j KUBE-SEP-", text)
    assert probs == ["0.3333333333", "0.5000000000"]
    svc_rules = [ln for ln in text.splitlines() if ln.startswith("-A KUBE-SVC-") and "->" in ln]
    assert len(svc_rules) == 3 and "statistic" not in svc_rules[-1]
    assert text.count("-j DNAT --to-destination 100.96.55.") == 3
    assert text.count("-j KUBE-MARK-MASQ") == 1 + 3  # the SVC chain's, one per endpoint
    assert "has no endpoints" not in text
    assert "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP" in text


def test_no_endpoints_means_no_dnat_and_a_reject() -> None:
    text = cluster.iptables_rules(_spec(0))
    assert "DNAT" not in text and "KUBE-SVC-" not in text
    assert re.search(r'has no endpoints" -m tcp --dport 80 -j REJECT', text)
    nft = cluster.nftables_rules(_spec(0))
    assert "dnat" not in nft and ": goto reject-chain" in nft


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
        f.cause or f.name in ("none", "two-node", "self-call") for f in faults.FAULTS.values()
    )
    with pytest.raises(UsageError, match="unknown fault 'nope'"):
        faults.get("nope")
    with pytest.raises(UsageError):
        ClusterSpec(nodes=3)


def test_state_round_trip() -> None:
    state = cluster.ClusterState(_spec(2), ("ht-n1",), ("ht-n1-a",), {"ht-n1-a": "veth1"}, ("x",))
    assert cluster.ClusterState.from_json(state.to_json()) == state
