"""The fault catalogue reproduced live: `hairtrace lab up --fault NAME` on this kernel (the
VM for what the host kernel cannot reproduce), traced, and diagnosed as the catalogue says.
Plus the no-false-alarm side: healthy variants again and again, and 300 concurrent
connections through a three-endpoint Service on the two-node lab."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_binary, needs_live

from tests.fault_cases import BROKEN, check_report
from tracer.lab.faults import FAULTS

ROOT = Path(__file__).resolve().parent.parent
HAIRTRACE = str(ROOT / ".venv" / "bin" / "hairtrace")
SVC = "100.67.30.133"
HOST_FAULTS = [n for n in BROKEN if not FAULTS[n].needs]

pytestmark = pytest.mark.live


def _scenario(name: str, curls: int = 1, proxy_mode: str = "iptables") -> dict[str, Any]:
    env = {**os.environ, "CURLS": str(curls), "CURL_TIMEOUT": "2", "PROXY_MODE": proxy_mode}
    res = subprocess.run(
        [str(ROOT / "scripts" / "scenario-fault"), name], check=False, capture_output=True,
        text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert res.returncode in (0, 3), res.stderr[-3000:]
    report: dict[str, Any] = json.loads(res.stdout)
    assert res.returncode == (3 if FAULTS[name].cause else 0)
    return report


@pytest.fixture(autouse=True)
def _live() -> None:
    needs_live()
    needs_binary("curl")


@pytest.mark.parametrize("name", HOST_FAULTS)
def test_fault_reproduced_and_diagnosed_on_this_kernel(name: str) -> None:
    report = _scenario(name, curls=6 if FAULTS[name].nodes == 2 else 1)
    check_report(name, report)


@pytest.mark.parametrize(
    ("name", "curls", "mode"),
    [("none", 1, "iptables")] * 3 + [("two-node", 4, "iptables")] * 2
    + [("none", 2, "nftables"), ("two-node", 4, "nftables")]
    + [("self-call", 1, "iptables")] * 3 + [("self-call", 2, "nftables")]
    + [("dns", 3, "iptables"), ("dns", 3, "nftables")],
)  # fmt: skip
def test_healthy_variants_are_ok_every_time(name: str, curls: int, mode: str) -> None:
    report = _scenario(name, curls, mode)
    check_report(name, report)
    assert len(report["connections"]) == curls


def test_300_concurrent_connections_through_a_multi_endpoint_service(tmp_path: Path) -> None:
    subprocess.run([HAIRTRACE, "lab", "down"], check=True, capture_output=True, timeout=120)
    subprocess.run([HAIRTRACE, "lab", "up", "--two-node"], check=True, capture_output=True,
                   timeout=180)  # fmt: skip
    try:
        load, out = tmp_path / "load.json", tmp_path / "report.json"
        res = subprocess.run(
            [HAIRTRACE, "--no-live", "--svc", SVC, "--netns", "ht-n1", "--json", str(out), "--",
             "sh", "-c", f"{HAIRTRACE} lab load -n 300 --json > {load}"],
            check=False, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        subprocess.run([HAIRTRACE, "lab", "down"], check=True, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    served = {c["sport"]: c["backend"] for c in json.loads(load.read_text())["connections"]}
    assert len(served) == 300 and None not in served
    report = json.loads(out.read_text())
    assert report["lost_events"] == 0
    conns = report["connections"]
    assert len(conns) == 300
    assert all(c["verdict"] == "ok" and c["break"] is None for c in conns)
    traced = {c["client"]["port"]: c["backend"]["ip"] for c in conns}
    assert traced == served  # each connection with the backend that answered it
    assert set(traced.values()) == {"100.96.54.247", "100.96.55.10", "100.96.55.11"}


def test_1000_dns_queries_from_every_pod_over_udp_and_tcp_are_each_accounted(
    tmp_path: Path,
) -> None:
    """Issue 13: no false alarm on healthy UDP and TCP under load. kube-dns (one endpoint,
    pod n1-b) gets 1,000 queries over UDP and 100 over TCP at once, from both pods of the
    traced node (n1-b calls its own Service); the source ports of the two loads may
    coincide. Every query is one connection of its protocol, with its client's address
    and port, and ok; no other connection is reported. (Node 2's pods are served by
    node 2's kube-proxy rules and conntrack, which a trace of node 1 does not see.)"""
    from tracer.lab.cluster import ClusterSpec

    pods = {p.ns: p.ip for p in ClusterSpec(nodes=2).pods if p.node == 1}
    subprocess.run([HAIRTRACE, "lab", "down"], check=True, capture_output=True, timeout=120)
    subprocess.run([HAIRTRACE, "lab", "up", "--two-node"], check=True, capture_output=True,
                   timeout=180)  # fmt: skip
    try:
        udp, tcp, out = tmp_path / "udp.json", tmp_path / "tcp.json", tmp_path / "report.json"
        load = f"{HAIRTRACE} lab load --dns --all-pods --json"
        both = f"{load} -n 1000 > {udp} & {load} --tcp -n 100 > {tcp}; wait"
        res = subprocess.run(
            [HAIRTRACE, "--no-live", "--svc", "100.67.30.140:53", "--netns", "ht-n1", "--json",
             str(out), "--", "sh", "-c", both],
            check=False, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        subprocess.run([HAIRTRACE, "lab", "down"], check=True, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    asked: dict[str, set[tuple[str, int]]] = {}
    for proto, path, n in (("udp", udp, 1000), ("tcp", tcp, 100)):
        queries = json.loads(path.read_text())["queries"]
        assert len(queries) == n and all(q["answered"] for q in queries)
        assert {q["pod"] for q in queries} == set(pods)
        asked[proto] = {(pods[q["pod"]], q["sport"]) for q in queries}
        assert len(asked[proto]) == n
    report = json.loads(out.read_text())
    assert report["lost_events"] == 0
    assert report["service"]["protocols"] == ["tcp", "udp"]
    conns = report["connections"]
    bad = [(c["proto"], c["client"], c["verdict"], c["break"] and c["break"]["cause"])
           for c in conns if c["verdict"] != "ok"]  # fmt: skip
    assert not bad, bad[:10]
    for proto in ("udp", "tcp"):
        traced = [(c["client"]["ip"], c["client"]["port"]) for c in conns if c["proto"] == proto]
        assert len(traced) == len(asked[proto]), (proto, len(traced))
        assert set(traced) == asked[proto]
    udp_conns = [c for c in conns if c["proto"] == "udp"]
    assert all([x["ok"] for x in c["exchanges"]] == [True] for c in udp_conns)
    assert {c["backend"]["ip"] for c in conns} == {"100.96.54.247"}


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_the_fix_of_a_stale_conntrack_entry_works(mode: str, tmp_path: Path) -> None:
    """stale-conntrack-entry: the conntrack -D the fix names, run as written in the node,
    lets the kept flow reach the new endpoint (its queries get answers again)."""
    import shlex
    import time

    from tracer.lab import cluster
    from tracer.lab.faults import STALE_FLOW_SPORT

    subprocess.run([HAIRTRACE, "lab", "down"], check=True, capture_output=True, timeout=120)
    subprocess.run([HAIRTRACE, "lab", "up", "--fault", "stale-conntrack-entry", "--proxy-mode",
                    mode], check=True, capture_output=True, timeout=180)  # fmt: skip
    try:
        out = tmp_path / "r.json"
        res = subprocess.run(
            [HAIRTRACE, "--no-live", "--svc", "100.67.30.140:53/udp", "--netns", "ht-n1",
             "--json", str(out), "--", "sleep", "4"],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode == 3, res.stderr[-3000:]
        check_report("stale-conntrack-entry", json.loads(out.read_text()))
        [conn] = json.loads(out.read_text())["connections"]
        fix = conn["break"]["fix"]
        command = fix.partition(": ")[2].partition(" (or")[0]
        assert command.startswith("conntrack -D -p udp"), fix
        state = cluster.load_state()
        assert state is not None
        log = state.spec.work_dir / f"udpflow-{STALE_FLOW_SPORT}.log"
        before = cluster.udp_flow_counts(log)
        time.sleep(1.0)
        assert cluster.udp_flow_counts(log)[1] == before[1], "no answers while the entry lives"
        done = subprocess.run(["ip", "netns", "exec", "ht-n1", *shlex.split(command)],
                              check=False, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while cluster.udp_flow_counts(log)[1] <= before[1] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.udp_flow_counts(log)[1] > before[1], "answered again after the fix"
    finally:
        subprocess.run([HAIRTRACE, "lab", "down"], check=True, capture_output=True, timeout=120)


def test_no_br_netfilter_in_the_vm() -> None:
    """br_netfilter is built into the host kernel; the Debian VM has it as a module."""
    needs_binary("qemu-system-x86_64")
    script = "modprobe -r br_netfilter && CURL_TIMEOUT=3 scripts/scenario-fault no-br-netfilter"
    res = subprocess.run(
        [str(ROOT / "scripts" / "vm-run"), "--timeout", "900", "--", "sh", "-c", script],
        check=False, capture_output=True, text=True, timeout=1000, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 3, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["provider"] == "fentry"
    check_report("no-br-netfilter", report)


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_a_service_by_name_is_resolved_from_kube_proxys_rules(mode: str) -> None:
    """Issue 14.1: `--svc prod/export` (and kube-dns by its port name) resolved from the
    node's kube-proxy rules, in each proxy mode; the seed diagnosis is unchanged."""
    from tracer.lab.cluster import default_endpoints

    os.environ["SVC"] = "prod/export"
    try:
        report = _scenario("bridge-nf-off", 1, mode)
        check_report("bridge-nf-off", report)
        eps = [{"ip": e.ip, "port": e.port, "proto": "tcp"} for e in default_endpoints(1)]
        assert report["service"] == {
            "ip": SVC, "port": 80, "protocols": ["tcp"], "ports_in_rules": ["80/tcp"],
            "name": "prod/export", "port_name": None, "endpoints_in_rules": eps,
            "prefix_len": 32,
        }  # fmt: skip
        os.environ["SVC"] = "kube-system/kube-dns:dns"
        report = _scenario("dns", 2, mode)
        check_report("dns", report)
        svc = report["service"]
        assert (svc["ip"], svc["port"], svc["protocols"]) == ("100.67.30.140", 53, ["udp"])
        assert (svc["name"], svc["port_name"]) == ("kube-system/kube-dns", "dns")
        assert [c["proto"] for c in report["connections"]] == ["udp", "udp"]
    finally:
        del os.environ["SVC"]


def test_an_unknown_service_name_is_a_usage_error_naming_close_matches() -> None:
    subprocess.run([HAIRTRACE, "lab", "down"], check=True, capture_output=True, timeout=120)
    subprocess.run([HAIRTRACE, "lab", "up", "--fault", "none"], check=True, capture_output=True,
                   timeout=180)  # fmt: skip
    try:
        res = [subprocess.run([HAIRTRACE, "--no-live", "--svc", svc, "--netns", "ht-n1", "--",
                               "true"], check=False, capture_output=True, text=True, timeout=60)
               for svc in ("prod/exprot", "prod/export:https")]  # fmt: skip
    finally:
        subprocess.run([HAIRTRACE, "lab", "down"], check=True, capture_output=True, timeout=120)
    assert [r.returncode for r in res] == [2, 2], [r.stderr for r in res]
    assert res[0].stderr == (
        "hairtrace: error: no Service prod/exprot in kube-proxy's rules in netns ht-n1; "
        "close matches: prod/export\n"
    )
    assert res[1].stderr == (
        "hairtrace: error: Service prod/export has no port https in kube-proxy's rules in "
        "netns ht-n1 (its ports: 80/tcp)\n"
    )
