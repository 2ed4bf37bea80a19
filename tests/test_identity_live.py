"""Connection identity on this kernel: one handshake is one connection, live and replayed.

A client that reuses its source port (here curl --local-port against a server that
closes first, so the client keeps no TIME_WAIT) opens a new connection each time: a new
ISN on the same 4-tuple. A SYN retransmitted until it gets through stays one connection
(`recovered`). The counts are checked against what the client itself counted, in the
live report, in the replay of its recording and in the replay of that recording cut in
the middle. The lab is scripts/seed-lab.sh (see tests/test_live.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_live import SVC, _lab, cli, hairtrace

pytestmark = pytest.mark.live

PORT = 40123  # the client's fixed source port


# One HTTP/1.0 request from a fixed source port: it reads until the server closes (the
# server closes first, so this side keeps no TIME_WAIT and the port is free again at
# once, as for a busy client); prints the status code, or 000 when it failed.
_CLIENT = """\
import socket, sys
port, timeout = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.settimeout(timeout)
try:
    s.connect((sys.argv[3], 80))
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.split(b" ", 2)[1].decode())
except OSError as exc:
    print("000", exc)
finally:
    s.close()
"""


def _curl(timeout: float) -> str:
    """A shell command: one request from PORT, in pod A."""
    return f"ip netns exec poda python3 -c '{_CLIENT}' {PORT} {timeout} {SVC}"


def _trace(tmp_path: Path, script: str, timeout: float = 120) -> tuple[dict[str, Any], str]:
    """The live report of `sh -c script` traced with a recording, and the script's output."""
    report, session, out = tmp_path / "live.json", tmp_path / "s.hts", tmp_path / "client.out"
    res = hairtrace(
        "--svc", SVC, "--netns", "node", "--json", str(report), "--record", str(session),
        "--", "sh", "-c", f"({script}) > {out} 2>&1",
        timeout=timeout,
    )  # fmt: skip
    assert "Traceback" not in res.stderr, res.stderr
    return json.loads(report.read_text()), out.read_text()


def _mine(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["connections"] if c["client"]["port"] == PORT]


def _replayed(session: Path, tmp_path: Path, *flags: str) -> dict[str, Any]:
    out = tmp_path / f"replay-{session.stem}{''.join(flags)}.json"
    res = cli("replay", str(session), "--json", str(out), *flags)
    assert res.returncode in (0, 3), res.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.fixture
def lab_healthy() -> Any:
    _lab("down")
    _lab("up", "1")
    try:
        yield
    finally:
        _lab("down")


@pytest.fixture
def lab_broken() -> Any:
    _lab("down")
    _lab("up", "0")
    try:
        yield
    finally:
        _lab("down")


def test_twenty_requests_from_one_port_are_twenty_connections(
    lab_healthy: None, tmp_path: Path
) -> None:
    script = "; ".join([_curl(3)] * 20)
    report, client = _trace(tmp_path, script)
    answered = client.split().count("200")
    assert answered == 20, client
    mine = _mine(report)
    assert len(mine) == answered
    assert [c["verdict"] for c in mine] == ["ok"] * 20
    assert len({c["isn"] for c in mine}) == 20 and None not in {c["isn"] for c in mine}
    assert not any(c["first_seen_mid_connection"] for c in mine)
    assert report["lost_events"] == 0
    session = tmp_path / "s.hts"
    for mode in ("--stream", "--no-stream"):
        assert _replayed(session, tmp_path, mode)["connections"] == report["connections"]

    # cut in the middle: the connections before the cut, as live judged them
    cut = tmp_path / "cut.hts"
    raw = session.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    part = _mine(_replayed(cut, tmp_path))
    assert 0 < len(part) < 20
    by_isn = {c["isn"]: c for c in mine}
    assert all(c["isn"] in by_isn for c in part)
    assert [c["isn"] for c in part] == [c["isn"] for c in mine[: len(part)]]
    for c in part[:-1]:  # the last one may have lost its end to the cut
        live = by_isn[c["isn"]]
        assert (c["verdict"], c["packets"]) == (live["verdict"], live["packets"])


def test_a_broken_attempt_then_a_healthy_one_from_the_same_port_are_two(
    lab_broken: None, tmp_path: Path
) -> None:
    fix = "ip netns exec node sysctl -qw net.bridge.bridge-nf-call-iptables=1"
    report, client = _trace(tmp_path, f"{_curl(2)}; {fix}; {_curl(3)}")
    assert client.split()[-1] == "200", client  # the first one timed out (000)
    mine = _mine(report)
    assert [c["verdict"] for c in mine] == ["broken", "ok"]
    assert mine[0]["break"]["cause"] == "bridge-nf-call-iptables-off"
    assert mine[0]["isn"] != mine[1]["isn"]
    for mode in ("--stream", "--no-stream"):
        assert _replayed(tmp_path / "s.hts", tmp_path, mode)["connections"] == report["connections"]


def test_a_syn_retransmitted_until_it_gets_through_is_one_recovered(
    lab_broken: None, tmp_path: Path
) -> None:
    """The fix lands between the first SYN and a retransmission (TCP retransmits after
    1 s, then 2 s more): the same handshake completes."""
    fix = "ip netns exec node sysctl -qw net.bridge.bridge-nf-call-iptables=1"
    report, client = _trace(tmp_path, f"{_curl(10)} & sleep 1.5; {fix}; wait")
    assert client.split() == ["200"], client
    mine = _mine(report)
    assert [c["verdict"] for c in mine] == ["recovered"], [c["verdict"] for c in mine]
    syns = [p for p in mine[0]["packets"] if p["role"] == "SYN"]
    assert len({p["seq"] for p in syns}) == 1 and len(syns) >= 2
    for mode in ("--stream", "--no-stream"):
        assert _replayed(tmp_path / "s.hts", tmp_path, mode)["connections"] == report["connections"]
