"""tracer.analysis.diff on saved reports of the seed case (no root, no kernel).

Fixtures in tests/fixtures/reports/: the host (6.18, tracepoint provider) and the
Debian 6.1 VM (fentry, kprobe), each broken (bridge-nf-call-iptables=0) and healthy.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tracer.analysis.diff import (
    DIFF_SCHEMA,
    POINT_KINDS,
    ConnectionDiff,
    DiffResult,
    PacketDiff,
    diff_reports,
    diff_sources,
    parse_reports,
    render_text,
)
from tracer.errors import UsageError
from tracer.events.model import POINTS

REPORTS = Path(__file__).resolve().parent.parent / "fixtures" / "reports"
Reports = dict[str, dict[str, Any]]
SNAT_BACK = "SNAT 100.96.54.247:80 -> 100.67.30.133:80"


def load(name: str) -> dict[str, Any]:
    return json.loads((REPORTS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def reports() -> Reports:
    return {p.stem: json.loads(p.read_text()) for p in REPORTS.glob("*.json")}


def _only_conn(result: DiffResult) -> ConnectionDiff:
    [conn] = result.connections
    return conn


def _packet(conn: ConnectionDiff, role: str) -> PacketDiff:
    return next(p for p in conn.packets if p.role == role)


# ------------------------------------------------------------ broken vs healthy


def test_host_broken_vs_healthy_names_synack_divergence_at_node(reports: Reports) -> None:
    res = diff_reports(reports["host-tracepoint-broken"], reports["host-tracepoint-healthy"])
    assert not res.equivalent
    assert res.level == "hops (tracepoint on both)" and not res.shared
    conn = _only_conn(res)
    assert (conn.verdict_a, conn.verdict_b) == ("broken", "ok")
    assert (conn.cause_a, conn.cause_b) == ("bridge-nf-call-iptables-off", None)
    synack = _packet(conn, "SYN+ACK")
    div = synack.divergence
    assert div is not None and div.index == 0
    assert div.netns == "node"
    # A (broken) goes straight across the bridge; B (healthy) is translated back
    assert div.a_steps == ()
    assert any("conntrack" in s for s in div.b_steps)
    assert any(f"reverse NAT ({SNAT_BACK})" in s for s in div.b_steps)
    assert "A goes straight from node/veth-podb to node/veth-poda without conntrack or NAT" in (
        div.sentence
    )
    assert "A reaches poda/eth0 as 100.96.54.247:80 -> 100.96.54.240" in div.sentence
    assert any("RST" in t for t in div.later)  # then only A's client sends a RST
    assert _packet(conn, "RST").only_in == "A"
    text = render_text(res)
    assert "verdict broken -> ok; cause bridge-nf-call-iptables-off -> none" in text
    assert "SYN+ACK: A goes straight" in text
    assert "only in A: RST x3" in text
    assert "result: different" in text


def test_vm_fentry_healthy_vs_broken_is_bridged_unchanged(reports: Reports) -> None:
    res = diff_reports(reports["vm-6.1-fentry-healthy"], reports["vm-6.1-fentry-broken"])
    conn = _only_conn(res)
    assert (conn.verdict_a, conn.verdict_b) == ("ok", "broken")
    div = _packet(conn, "SYN+ACK").divergence
    assert div is not None and div.netns == "node"
    assert div.sentence.startswith(
        "SYN+ACK: A passes conntrack (nf_conntrack_in) and reverse NAT "
        f"({SNAT_BACK}) in node; B is only bridged (br_forward) to node/veth-poda "
        "without conntrack or NAT"
    )
    assert _packet(conn, "RST").only_in == "B"
    assert _packet(conn, "ACK (original)").only_in == "A"


def test_mixed_providers_broken_vs_healthy_still_names_the_synack(reports: Reports) -> None:
    res = diff_reports(reports["host-tracepoint-healthy"], reports["vm-6.1-fentry-broken"])
    assert res.shared
    div = _packet(_only_conn(res), "SYN+ACK").divergence
    assert div is not None and div.netns == "node"
    assert f"reverse NAT ({SNAT_BACK})" in div.sentence
    assert "B goes straight from node/veth-podb to node/veth-poda without conntrack or NAT" in (
        div.sentence
    )


# ------------------------------------------------------------------ equivalence


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("host-tracepoint-broken", "vm-6.1-fentry-broken"),
        ("vm-6.1-fentry-broken", "host-tracepoint-broken"),
        ("host-tracepoint-broken", "vm-6.1-kprobe-broken"),
        ("host-tracepoint-broken", "vm-6.12-fentry-broken"),
    ],
)
def test_host_tracepoint_and_vm_function_providers_agree_on_broken(
    reports: Reports, a: str, b: str
) -> None:
    res = diff_reports(reports[a], reports[b])
    assert res.equivalent, render_text(res)
    pa, pb = reports[a]["provider"], reports[b]["provider"]
    assert res.shared and res.level == f"shared stages ({pa} vs {pb})"
    # what only one of them can see is left out, and said so
    assert {"bridge", "netfilter"} <= set(res.left_out_kinds)
    assert {"dev_rx", "dev_tx", "conntrack", "nat", "reset", "drop"} <= set(res.compared_kinds)
    conn = _only_conn(res)
    assert [p.role for p in conn.packets] == ["SYN", "SYN+ACK", "RST"]
    assert all(p.same for p in conn.packets)
    text = render_text(res)
    assert f"compared at: shared stages ({pa} vs {pb})" in text
    assert "result: equivalent" in text
    # e.g. 3 attempts on the host, 2 under slow TCG: shown, not a difference
    uneven = any(p.count_a != p.count_b for p in conn.packets)
    assert ("packet counts (timing, not compared)" in text) == uneven
    assert uneven or b != "vm-6.1-fentry-broken"


def test_fentry_vs_kprobe_ignores_points_one_side_skipped(reports: Reports) -> None:
    for verdict in ("broken", "healthy"):
        res = diff_reports(reports[f"vm-6.1-fentry-{verdict}"], reports[f"vm-6.1-kprobe-{verdict}"])
        assert res.equivalent, render_text(res)
        # fentry on 6.1 refuses br_handle_frame; kprobe has no nf_nat_setup_info program
        assert res.ignored_points == ("br_handle_frame", "nf_nat_setup_info")
        assert "bridge" in res.compared_kinds  # both function providers see the bridge


@pytest.mark.parametrize("name", sorted(p.stem for p in REPORTS.glob("*.json")))
def test_report_against_itself_is_equivalent(reports: Reports, name: str) -> None:
    res = diff_reports(reports[name], copy.deepcopy(reports[name]))
    assert res.equivalent
    assert res.level == f"hops ({reports[name]['provider']} on both)"
    assert all(p.same for c in res.connections for p in c.packets)


def _with_client_port(report: dict[str, Any], port: int) -> dict[str, Any]:
    """The same report as if the client had used another source port."""
    out = copy.deepcopy(report)
    for conn in out["connections"]:
        old = f"{conn['client']['ip']}:{conn['client']['port']}"
        new = f"{conn['client']['ip']}:{port}"
        conn["client"]["port"] = port
        text = json.dumps(conn["packets"]).replace(old, new)
        conn["packets"] = json.loads(text)
    return out


@pytest.mark.parametrize(
    "name", ["host-tracepoint-broken", "host-tracepoint-healthy", "vm-6.1-fentry-broken"]
)
def test_client_ports_do_not_matter(reports: Reports, name: str) -> None:
    other = _with_client_port(reports[name], 40000)
    assert other != reports[name]
    res = diff_reports(reports[name], other)
    assert res.equivalent, render_text(res)
    assert _only_conn(res).client == "100.96.54.240"


def test_client_ports_differ_between_real_runs_anyway(reports: Reports) -> None:
    a, b = reports["host-tracepoint-broken"], reports["vm-6.1-kprobe-broken"]
    assert a["connections"][0]["client"]["port"] != b["connections"][0]["client"]["port"]
    assert diff_reports(a, b).equivalent


def _renamed(report: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    text = json.dumps(report)
    for old, new in names.items():
        text = re.sub(rf'"{old}"', f'"{new}"', text)
    return json.loads(text)


def test_netns_are_matched_by_role_not_name(reports: Reports) -> None:
    a = reports["host-tracepoint-broken"]
    b = _renamed(reports["vm-6.1-fentry-broken"], {"node": "dn", "poda": "da", "podb": "db"})
    res = diff_reports(a, b)
    assert res.equivalent, render_text(res)
    assert set(res.netns_roles) == {
        ("node", "node", "dn"),
        ("client", "poda", "da"),
        ("backend", "podb", "db"),
    }
    assert "netns matched by role: client = poda in A, da in B" in render_text(res)


# ------------------------------------------------------------- what differs how


def test_healthy_host_vs_vm_shows_the_kernel_difference_once(reports: Reports) -> None:
    """6.18 sends the DNATed client packets out of cni0 before the port; 6.1 and 6.12 do not."""
    res = diff_reports(reports["host-tracepoint-healthy"], reports["vm-6.1-fentry-healthy"])
    conn = _only_conn(res)
    assert not res.equivalent and conn.verdict_a == conn.verdict_b == "ok"
    syn = _packet(conn, "SYN").divergence
    assert syn is not None and (syn.netns, syn.dev) == ("node", "cni0")
    assert syn.a_steps == ("is sent out of node/cni0 (net_dev_start_xmit)",)
    assert "B goes straight from NAT (DNAT 100.67.30.133:80 -> 100.96.54.247:80) in node" in (
        syn.sentence
    )
    assert _packet(conn, "SYN+ACK").same
    text = render_text(res)
    assert "  ACK (original): the same difference as SYN\n" in text
    assert text.count("is sent out of node/cni0") == 1


def test_the_cni0_difference_is_the_kernel_not_the_provider(reports: Reports) -> None:
    """Tracepoint provider on both sides, 6.18 host vs 6.12 VM: the same difference, at hops."""
    res = diff_reports(reports["host-tracepoint-healthy"], reports["vm-6.12-tracepoint-healthy"])
    assert res.level == "hops (tracepoint on both)"
    syn = _packet(_only_conn(res), "SYN").divergence
    assert syn is not None
    assert syn.sentence == (
        "SYN: A is sent out of node/cni0 (net_dev_start_xmit); B goes straight from "
        "NAT (DNAT 100.67.30.133:80 -> 100.96.54.247:80) in node to netfilter FORWARD "
        "(nf:FORWARD@filter) in node"
    )
    # and 6.12 agrees with 6.1 at the shared level
    assert diff_reports(
        reports["vm-6.12-fentry-healthy"], reports["vm-6.1-kprobe-healthy"]
    ).equivalent


def test_packet_role_missing_on_one_side(reports: Reports) -> None:
    a = reports["host-tracepoint-broken"]
    b = copy.deepcopy(a)
    conn = b["connections"][0]
    conn["packets"] = [p for p in conn["packets"] if p["role"] != "RST"]
    res = diff_reports(a, b)
    assert not res.equivalent
    rst = _packet(_only_conn(res), "RST")
    assert (rst.only_in, rst.count_a, rst.count_b) == ("A", 3, 0)
    assert "only in A: RST x3" in render_text(res)


def test_cause_change_alone_is_a_difference(reports: Reports) -> None:
    a = reports["host-tracepoint-broken"]
    b = copy.deepcopy(a)
    b["connections"][0]["break"]["cause"] = "br-netfilter-not-loaded"
    res = diff_reports(a, b)
    assert not res.equivalent
    conn = _only_conn(res)
    assert conn.verdict_a == conn.verdict_b == "broken"
    assert "cause bridge-nf-call-iptables-off -> br-netfilter-not-loaded" in render_text(res)


def test_connection_on_one_side_only(reports: Reports) -> None:
    a = reports["host-tracepoint-broken"]
    b = copy.deepcopy(a)
    b["connections"] = []
    res = diff_reports(a, b)
    assert not res.equivalent
    assert _only_conn(res).only_in == "A"
    assert "only in A: broken, cause bridge-nf-call-iptables-off" in render_text(res)


def test_later_packet_of_a_role_is_compared_too(reports: Reports) -> None:
    a = reports["host-tracepoint-broken"]
    b = copy.deepcopy(a)
    synacks = [p for p in b["connections"][0]["packets"] if p["role"] == "SYN+ACK"]
    synacks[1]["hops"] = [h for h in synacks[1]["hops"] if h["point"] != "tcp_send_reset"]
    res = diff_reports(a, b)
    div = _packet(_only_conn(res), "SYN+ACK").divergence
    assert div is not None and div.index == 1
    assert div.sentence.startswith("SYN+ACK #2: A makes poda send a RST (tcp_send_reset)")


def test_every_hop_point_of_the_fixtures_has_a_kind(reports: Reports) -> None:
    assert POINT_KINDS == {info.name: info.kind for info in POINTS.values()}
    points = {
        h["point"]
        for r in reports.values()
        for c in r["connections"]
        for p in c["packets"]
        for h in p["hops"]
    }
    assert points <= set(POINT_KINDS)


def test_to_dict_is_json(reports: Reports) -> None:
    res = diff_reports(
        reports["host-tracepoint-broken"],
        reports["vm-6.1-fentry-healthy"],
        names=("host.json", "vm.json"),
    )
    doc = json.loads(json.dumps(res.to_dict()))
    assert doc["schema"] == DIFF_SCHEMA
    assert doc["equivalent"] is False
    assert doc["level"] == "shared stages (tracepoint vs fentry)"
    assert (doc["a"]["name"], doc["b"]["provider"]) == ("host.json", "fentry")
    [conn] = doc["connections"]
    assert conn["verdict"] == {"a": "broken", "b": "ok"}
    synack = next(p for p in conn["packets"] if p["role"] == "SYN+ACK")
    assert synack["divergence"]["netns"] == "node"
    assert "A = tracepoint on 6.18" in render_text(res) and "(host.json)" in render_text(res)


# ------------------------------------------------------------------- reading in


def test_parse_reports_reads_concatenated_documents() -> None:
    text = "\n".join((REPORTS / f"{n}.json").read_text() for n in ("vm-6.1-fentry-broken",) * 2)
    docs = parse_reports(text + "\n\n")
    assert len(docs) == 2 and docs[0] == docs[1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no report in it"),
        ("{", "not JSON"),
        ("[1]", "not a hairtrace report"),
        ('{"schema": "hairtrace/session@1"}', "schema 'hairtrace/session@1'"),
        ('{"schema": "hairtrace/report@1"}', "without a connections list"),
    ],
)
def test_parse_reports_rejects_with_one_line(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_reports(text, "x.json")
    assert str(info.value).startswith("x.json: ") and "\n" not in str(info.value)


def test_diff_reports_rejects_other_documents() -> None:
    with pytest.raises(UsageError, match="^B: not a hairtrace/report@1 report"):
        diff_reports(load("host-tracepoint-broken"), {"schema": "other"})


def test_diff_sources_uses_the_callers_loader() -> None:
    seen: list[str] = []

    def loader(src: str) -> dict[str, Any]:
        seen.append(src)
        return load(src)

    res = diff_sources("host-tracepoint-broken", "vm-6.1-kprobe-broken", loader)
    assert seen == ["host-tracepoint-broken", "vm-6.1-kprobe-broken"]
    assert res.equivalent and res.a.name == "host-tracepoint-broken"


def test_a_service_traced_on_every_port_is_written_ip_any() -> None:
    """Issue 17.8: text output writes "any port" one way, IP:any ("port": 0 in JSON)."""
    from tracer.analysis.diff import _side
    from tracer.events.model import service_label

    assert service_label("100.67.30.133", 0) == "100.67.30.133:any"
    assert service_label("100.67.30.133", 80) == "100.67.30.133:80"
    side = _side("A", "a.json", {"service": {"ip": "100.67.30.133", "port": 0}})
    assert side.service == "100.67.30.133:any"
    assert _side("B", "", {"service": {"ip": "10.0.0.1", "port": 53}}).service == "10.0.0.1:53"
