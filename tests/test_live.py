"""End to end on this kernel: real lab in network namespaces, real BPF, the CLI as users run it.

The lab here is scripts/seed-lab.sh: plain ip/iptables commands, built independently
of hairtrace's own lab code, so the tracer is shown to work on a topology it did not make.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_live

ROOT = Path(__file__).resolve().parent.parent
SEED_LAB = ROOT / "scripts" / "seed-lab.sh"
SVC = "100.67.30.133"
CURL = [
    "ip",
    "netns",
    "exec",
    "poda",
    "curl",
    "-sS",
    "-m",
    "3",
    "-o",
    "/dev/null",
    "-w",
    "%{http_code}",
    f"http://{SVC}/",
]
HT_PROGS = {"ht_dev_rx", "ht_dev_tx", "ht_drop", "ht_tcp_reset", "ht_nf_pre_ct"}

pytestmark = pytest.mark.live


def _lab(action: str, *args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(
        ["bash", str(SEED_LAB), action, *args],
        check=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def seed_lab(request: pytest.FixtureRequest) -> Iterator[str]:
    needs_live()
    knob = getattr(request, "param", "0")
    _lab("down")
    _lab("up", knob)
    try:
        yield knob
    finally:
        _lab("down")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The hairtrace command line, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def hairtrace(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return cli("--no-live", *args, timeout=timeout)


def _our_programs() -> set[str]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "list"], capture_output=True, text=True, check=True
    ).stdout
    return {p.get("name", "") for p in json.loads(out)} & HT_PROGS


@pytest.mark.parametrize("seed_lab", ["0"], indirect=True)
@pytest.mark.parametrize("svc", [SVC, "prod/export"])
def test_seed_broken(seed_lab: str, svc: str, tmp_path: Path) -> None:
    """The seed case, with the Service by address and by name (issue 14.1: the name is
    resolved from the rules scripts/seed-lab.sh wrote, in kube-proxy's iptables shape)."""
    report = tmp_path / "r.json"
    res = hairtrace("--svc", svc, "--netns", "node", "--json", str(report), "--", *CURL)
    assert res.returncode == 3, res.stderr
    r = json.loads(report.read_text())
    assert r["schema"] == "hairtrace/report@1" and r["provider"] == "tracepoint"
    assert r["lost_events"] == 0 and r["events"] > 0
    assert r["command_status"] == 28, "curl itself timed out"
    assert r["service"]["name"] == "prod/export" and r["service"]["port_name"] is None
    assert (r["service"]["ip"], r["service"]["port"]) == (SVC, 0 if svc == SVC else 80)
    assert r["service"]["endpoints_in_rules"] == [
        {"ip": "100.96.54.247", "port": 80, "proto": "tcp"}
    ]
    assert "service prod/export 100.67.30.133:" in res.stderr, "the header names it"
    [conn] = r["connections"]
    assert conn["client"]["ip"] == "100.96.54.240"
    assert conn["service"] == {"ip": SVC, "port": 80, "name": "prod/export"}
    assert conn["backend"] == {"ip": "100.96.54.247", "port": 80, "pod": None}, (
        "no pod: a lab netns"
    )
    assert conn["verdict"] == "broken"
    roles = [p["role"] for p in conn["packets"]]
    assert roles[:3] == ["SYN", "SYN+ACK", "RST"]
    for p in conn["packets"][:3]:
        assert p["hops"], p
        assert {"netns", "dev", "point", "src", "dst", "ct", "nat"} <= set(p["hops"][0])
    brk = conn["break"]
    assert brk["packet_role"] == "SYN+ACK" and brk["netns"] == "node"
    assert brk["cause"] == "bridge-nf-call-iptables-off"
    assert brk["dev"] == "cni0"
    assert brk["evidence"] and brk["fix"]
    assert "attached 11 programs" in res.stderr
    assert _our_programs() == set(), "programs must be detached after the trace"


@pytest.mark.parametrize("seed_lab", ["1"], indirect=True)
def test_seed_healthy(seed_lab: str, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    res = hairtrace("--svc", f"{SVC}:80", "--netns", "node", "--json", str(report), "--", *CURL)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "200", "curl succeeds while traced"
    r = json.loads(report.read_text())
    assert r["lost_events"] == 0 and r["command_status"] == 0
    [conn] = r["connections"]
    assert conn["verdict"] == "ok" and conn["break"] is None
    synack = next(p for p in conn["packets"] if p["role"] == "SYN+ACK")
    assert any(h["nat"] and f"-> {SVC}:80" in h["nat"] for h in synack["hops"]), synack


DNS = "100.67.30.140"
DIG = ["ip", "netns", "exec", "poda", "dig", f"@{DNS}", "+time=2", "+tries=1",
       "export.prod.svc.cluster.local"]  # fmt: skip


@pytest.mark.parametrize("seed_lab", ["0", "1"], indirect=True)
def test_udp_seed_case_on_the_plain_lab(seed_lab: str, tmp_path: Path) -> None:
    """Issue 13: a DNS query over UDP to a same-node kube-dns pod. With
    bridge-nf-call-iptables=0 the reply is bridged back without reverse NAT: one udp
    connection, broken, on the reply in the node netns, and dig times out; with 1 dig
    answers and the connection is ok."""
    report = tmp_path / "r.json"
    res = hairtrace("--svc", f"{DNS}:53/udp", "--netns", "node", "--json", str(report), "--",
                    *DIG)  # fmt: skip
    r = json.loads(report.read_text())
    assert r["lost_events"] == 0 and r["service"]["protocols"] == ["udp"]
    [conn] = r["connections"]
    assert conn["proto"] == "udp" and conn["isn"] is None
    assert conn["service"] == {"ip": DNS, "port": 53, "name": "kube-system/kube-dns"}
    assert conn["backend"] == {"ip": "100.96.54.247", "port": 53, "pod": None}
    request, reply = conn["packets"][:2]
    assert (request["role"], request["direction"]) == ("UDP", "original")
    assert (reply["role"], reply["direction"]) == ("UDP", "reply")
    assert request["length"] > 8 and reply["length"] > request["length"], "the answer is longer"
    if seed_lab == "1":
        assert res.returncode == 0, res.stderr
        assert r["command_status"] == 0 and "100.67.30.133" in res.stdout, "dig answered"
        assert (conn["verdict"], conn["break"]) == ("ok", None)
        assert conn["exchanges"] == [{"request": 0, "reply": 1, "icmp": None, "ok": True,
                                      "pending": False}]  # fmt: skip
        assert reply["hops"][-1]["src"] == f"{DNS}:53", "reverse-translated at the client"
        return
    assert res.returncode == 3, res.stderr
    assert r["command_status"] == 9 and "timed out" in res.stdout, "dig got no answer"
    assert conn["verdict"] == "broken"
    assert conn["exchanges"] == [{"request": 0, "reply": 1, "icmp": None, "ok": False,
                                  "pending": False}]  # fmt: skip
    brk = conn["break"]
    assert (brk["packet_role"], brk["packet_index"], brk["netns"], brk["dev"]) == (
        "UDP", 1, "node", "cni0")  # fmt: skip
    assert brk["cause"] == "bridge-nf-call-iptables-off"
    assert reply["hops"][-1]["src"] == "100.96.54.247:53", "the client got the pod's address"
    evidence = "\n".join(brk["evidence"])
    assert "net.bridge.bridge-nf-call-iptables = 0 in netns node" in evidence
    # the client's stack answers the reply it has no socket for with port unreachable,
    # an ICMP error of the same connection, on its original side
    icmp = [p for p in conn["packets"] if p["role"] == "ICMP"]
    assert icmp and icmp[0]["direction"] == "original", icmp
    assert icmp[0]["icmp"]["type"] == 3 and icmp[0]["icmp"]["code"] == 3
    assert icmp[0]["icmp"]["from"] == "100.96.54.240"
    assert "answered with ICMP port unreachable" in evidence


@pytest.fixture
def self_call_lab() -> Iterator[None]:
    """The seed lab with pod A as the Service's only endpoint (hairpin on, masquerade)."""
    needs_live()
    _lab("down")
    _lab("up", "1", env={"SEED_LAB_SELF": "1"})
    try:
        yield
    finally:
        _lab("down")


def test_pod_calling_its_own_service_is_ok(self_call_lab: None, tmp_path: Path) -> None:
    """Issue 17.1: the SYN+ACK leaves pod A from its own address (the backend's transmit)
    and comes back, hairpinned and reverse-NATed, from the Service: that is success."""
    report, session = tmp_path / "r.json", tmp_path / "s.hts"
    res = hairtrace("--svc", SVC, "--netns", "node", "--json", str(report),
                    "--record", str(session), "--", *CURL)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "200"
    r = json.loads(report.read_text())
    [conn] = r["connections"]
    assert conn["client"]["ip"] == conn["backend"]["ip"] == "100.96.54.240"
    assert (conn["verdict"], conn["break"]) == ("ok", None), conn["break"]
    assert [p["role"] for p in conn["packets"]].count("SYN") == 1
    replayed = cli("replay", str(session), "--json", "-")
    assert replayed.returncode == 0, replayed.stderr
    [again] = json.loads(replayed.stdout)["connections"]
    assert (again["verdict"], again["break"]) == ("ok", None)


@pytest.mark.parametrize("seed_lab", ["1"], indirect=True)
def test_a_port_or_address_the_rules_lack_is_named(seed_lab: str, tmp_path: Path) -> None:
    """Issue 17.6: a port the Service does not have, and a mistyped address, are said to be
    missing from kube-proxy's rules, at start and (for the port) in the break."""
    report = tmp_path / "r.json"
    curl81 = [*CURL[:-1], f"http://{SVC}:81/"]
    res = hairtrace("--svc", f"{SVC}:81/tcp", "--netns", "node", "--json", str(report), "--",
                    *curl81)  # fmt: skip
    assert res.returncode == 3, res.stderr
    want = (f"kube-proxy's rules in netns node have no port 81/tcp for Service {SVC} "
            "(its ports: 80/tcp)")  # fmt: skip
    assert res.stderr.splitlines()[0] == f"warning: {want}", "said at start, before the trace"
    r = json.loads(report.read_text())
    assert r["warnings"] == [want]
    assert r["service"] == {"ip": SVC, "port": 81, "protocols": ["tcp"],
                            "ports_in_rules": ["80/tcp"], "name": None, "port_name": None,
                            "endpoints_in_rules": [], "prefix_len": 32}  # fmt: skip
    [conn] = r["connections"]
    brk = conn["break"]
    assert (conn["verdict"], brk["cause"], brk["packet_role"]) == (
        "broken",
        "no-such-service",
        "SYN",
    )
    assert "80/tcp" in brk["explanation"] and "81" in brk["explanation"]

    res = hairtrace("--svc", "10.96.0.99", "--netns", "node", "--json", str(report), "--", *CURL)
    assert res.returncode == 0, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith("warning: kube-proxy's rules in netns node have no Service with "
                            "the address 10.96.0.99"), first  # fmt: skip
    assert SVC in first, "the closest Service address is offered"
    r = json.loads(report.read_text())
    assert r["connections"] == [] and r["service"]["ports_in_rules"] == []
    assert "no connection to the service was seen" in res.stderr


@pytest.mark.parametrize("seed_lab", ["0"], indirect=True)
def test_sigterm_ends_cleanly_with_report(seed_lab: str, tmp_path: Path) -> None:
    report, ready = tmp_path / "r.json", tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tracer.cli",
            "--no-live",
            "--svc",
            SVC,
            "--netns",
            "node",
            "--json",
            str(report),
            "--ready-file",
            str(ready),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "tracer never attached"
            time.sleep(0.05)
        assert _our_programs() == HT_PROGS
        subprocess.run(CURL, check=False, capture_output=True, timeout=10)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    r = json.loads(report.read_text())
    assert [c["verdict"] for c in r["connections"]] == ["broken"]
    assert _our_programs() == set()


@pytest.mark.parametrize("seed_lab", ["1"], indirect=True)
def test_lost_events_are_counted_and_reported(seed_lab: str, tmp_path: Path) -> None:
    """A 4 KiB ring buffer cannot hold a whole HTTP exchange between two drains."""
    report = tmp_path / "r.json"
    res = hairtrace(
        "--svc",
        SVC,
        "--netns",
        "node",
        "--json",
        str(report),
        "--ringbuf-bytes",
        "4096",
        "--",
        *CURL,
    )
    r = json.loads(report.read_text())
    assert r["lost_events"] > 0, "the tiny buffer must overflow for this test to mean anything"
    assert sum(r["lost_by_point"].values()) == r["lost_events"]
    assert "LOST" in res.stderr
    assert r["connections"], "the connection is still reported"
    assert all(c["verdict"] == "incomplete" for c in r["connections"])
    assert res.returncode == 0, res.stderr


# An HTTP request sent as 60 small segments (one header line each, TCP_NODELAY).
_CHATTY = """\
import socket, sys, time
s = socket.create_connection((sys.argv[1], 80), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"GET / HTTP/1.0\\r\\n")
for i in range(60):
    s.sendall(b"X-Pad-%d: x\\r\\n" % i)
    time.sleep(0.002)
s.sendall(b"\\r\\n")
resp = b""
while chunk := s.recv(4096):
    resp += chunk
s.close()
print(resp.split()[1].decode())
"""


@pytest.mark.parametrize("seed_lab", ["1"], indirect=True)
def test_data_budget_traces_handshake_and_counts_the_rest(seed_lab: str, tmp_path: Path) -> None:
    """Past --data-packets, a connection's data packets are counted, not emitted; 0 = all."""
    chatty = ["ip", "netns", "exec", "poda", sys.executable, "-c", _CHATTY, SVC]
    reports = {}
    for budget in ("4", "0"):
        report = tmp_path / f"r{budget}.json"
        res = hairtrace("--svc", f"{SVC}:80", "--netns", "node", "--json", str(report),
                        "--data-packets", budget, "--", *chatty)  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "200"
        reports[budget] = json.loads(report.read_text())
    capped, every = reports["4"], reports["0"]
    assert (capped["data_budget"], every["data_budget"]) == (4, 0)
    assert every["over_budget_events"] == 0 and every["over_budget_by_point"] == {}
    assert capped["over_budget_events"] > 0
    assert sum(capped["over_budget_by_point"].values()) == capped["over_budget_events"]
    assert capped["events"] < every["events"]
    for r in (capped, every):
        [conn] = r["connections"]
        assert conn["verdict"] == "ok", conn
        roles = [p["role"] for p in conn["packets"]]
        assert roles[:3] == ["SYN", "SYN+ACK", "ACK"], roles
        assert "FIN" in roles, roles  # control packets are never over budget
    data = [len([p for p in r["connections"][0]["packets"] if p["role"] == "DATA"])
            for r in (capped, every)]  # fmt: skip
    assert data[0] < data[1], data


def test_demo_reproduces_diagnoses_fixes_and_cleans_up(tmp_path: Path) -> None:
    needs_live()
    out = tmp_path / "demo.json"
    res = cli("demo", "--json", str(out), timeout=120)
    assert res.returncode == 0, res.stderr
    reports = json.loads(out.read_text())
    [broken] = reports["broken"]["connections"]
    assert broken["verdict"] == "broken"
    assert broken["break"]["cause"] == "bridge-nf-call-iptables-off"
    assert [c["verdict"] for c in reports["fixed"]["connections"]] == ["ok"]
    assert "bridge-nf-call-iptables-off" in res.stderr and "As expected" in res.stderr
    names = subprocess.run(
        ["ip", "netns", "list"], check=False, capture_output=True, text=True
    ).stdout
    assert "ht-node" not in names and "ht-pod-a" not in names


def test_lab_cli_up_status_down() -> None:
    needs_live()
    try:
        up = cli("lab", "up", "--bridge-nf-call-iptables", "1")
        assert up.returncode == 0, up.stderr
        st = cli("lab", "status", "--json")
        assert st.returncode == 0, st.stderr
        data = json.loads(st.stdout)
        assert data["bridge_nf_call_iptables"] == 1 and data["server_alive"]
    finally:
        down = cli("lab", "down")
    assert down.returncode == 0, down.stderr
    assert cli("lab", "status").returncode == 1


def test_other_labs_with_the_same_addresses_stay_out(tmp_path: Path) -> None:
    """Two seed labs on one host: tracing node sees node's pods only, and says so."""
    needs_live()
    other = {"SEED_LAB_NODE": "xn", "SEED_LAB_POD_A": "xa", "SEED_LAB_POD_B": "xb"}
    env = {**os.environ, **other}
    lab = ["bash", str(SEED_LAB)]
    subprocess.run([*lab, "down"], check=True, capture_output=True)
    subprocess.run([*lab, "down"], check=True, capture_output=True, env=env)
    try:
        subprocess.run([*lab, "up", "0"], check=True, capture_output=True)
        subprocess.run([*lab, "up", "0"], check=True, capture_output=True, env=env)
        report = tmp_path / "r.json"
        both = (
            f"ip netns exec poda curl -s -m 2 http://{SVC}/ & "
            f"ip netns exec xa curl -s -m 2 http://{SVC}/; wait"
        )
        res = hairtrace(
            "--svc", SVC, "--netns", "node", "--json", str(report), "--", "sh", "-c", both
        )
    finally:
        subprocess.run([*lab, "down"], check=True, capture_output=True)
        subprocess.run([*lab, "down"], check=True, capture_output=True, env=env)
    assert res.returncode == 3, res.stderr
    r = json.loads(report.read_text())
    assert r["scope"] == ["node", "poda", "podb"]
    assert r["events_out_of_scope"] > 0
    [conn] = r["connections"]
    hops = {h["netns"] for p in conn["packets"] for h in p["hops"]}
    assert hops <= {"node", "poda", "podb"}
    assert conn["break"]["cause"] == "bridge-nf-call-iptables-off"
