"""`--svc CIDR` end to end (issue 15.2): every Service of the seed lab's range at once.

scripts/seed-lab.sh with SEED_LAB_STATUS=1, broken (bridge-nf-call-iptables=0 in netns node): prod/export's
replies are bridged back untranslated, prod/status (its endpoint the node itself) is
healthy. One client in pod A calls both Services N times each and counts its own
results; the report's per-Service tally must agree with it.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_live
from test_live import _lab, hairtrace

pytestmark = pytest.mark.live

N = 3
EXPORT, STATUS = "100.67.30.133", "100.67.30.134"
# each call a new TCP connection; the client prints what it saw of each Service
CLIENT = f"""
import json, socket
seen = {{}}
for ip in ({EXPORT!r}, {STATUS!r}):
    ok = 0
    for _ in range({N}):
        s = socket.socket()
        s.settimeout(1.5)
        try:
            s.connect((ip, 80))
            s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
            ok += s.recv(12).startswith(b"HTTP/1.0 200")
        except OSError:
            pass
        finally:
            s.close()
    seen[ip] = ok
print(json.dumps(seen))
"""
# In the tracer's netns: scrape --metrics until every call is judged (a broken one ~31 s
# after its SYN, the idle limit), then print the connection counts it showed.
SCRAPE = f"""
import json, re, sys, time, urllib.request
url, want, counts = sys.argv[1], 2 * {N}, {{}}
line = re.compile(r'^hairtrace_connections_total{{(.*)}} ([0-9.e+]+)$')
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    counts = {{}}
    for m in filter(None, map(line.match, text.splitlines())):
        labels = dict(re.findall(r'(\\w+)="([^"]*)"', m.group(1)))
        counts[labels["service"] + "|" + labels["verdict"] + "|" + labels["cause"]] = float(m.group(2))
    if sum(counts.values()) >= want:
        break
    time.sleep(1)
print(json.dumps(counts))
"""


@pytest.fixture
def two_service_lab() -> Iterator[None]:
    """scripts/seed-lab.sh broken, with prod/status (SEED_LAB_STATUS=1); removed after."""
    needs_live()
    _lab("down")
    _lab("up", "0", env={"SEED_LAB_STATUS": "1"})
    try:
        yield
    finally:
        _lab("down")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_service_of_a_range(two_service_lab: None, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    (tmp_path / "client.py").write_text(CLIENT)
    (tmp_path / "scrape.py").write_text(SCRAPE)
    url = f"http://127.0.0.1:{_free_port()}/metrics"
    both = (f"ip netns exec poda {sys.executable} {tmp_path / 'client.py'} && "
            f"{sys.executable} {tmp_path / 'scrape.py'} {url}")  # fmt: skip
    res = hairtrace("--svc", "100.64.0.0/10", "--netns", "node", "--json", str(report),
                    "--metrics", url.split("/")[2], "--", "sh", "-c", both,
                    timeout=180)  # fmt: skip
    assert res.returncode == 3, res.stderr
    *_, client_line, scrape_line = res.stdout.strip().splitlines()
    seen = json.loads(client_line)
    assert seen == {EXPORT: 0, STATUS: N}, "the client's own counts"
    # the scrape during the trace: broken connections by Service and cause, the healthy
    # Service ok only (issue 15's "what must be shown")
    assert json.loads(scrape_line) == {
        "prod/export|broken|bridge-nf-call-iptables-off": N,
        "prod/status|ok|": N,
    }
    r = json.loads(report.read_text())
    assert r["service"]["ip"] == "100.64.0.0" and r["service"]["prefix_len"] == 10
    assert r["lost_events"] == 0
    by = {(s["ip"], s["port"], s["proto"]): s for s in r["services"]}
    assert set(by) == {(EXPORT, 80, "tcp"), (STATUS, 80, "tcp")}, r["services"]
    export, status = by[(EXPORT, 80, "tcp")], by[(STATUS, 80, "tcp")]
    assert export["name"] == "prod/export" and status["name"] == "prod/status"
    assert (export["connections"], export["broken"], export["ok"]) == (N, N, 0)
    assert export["causes"] == {"bridge-nf-call-iptables-off": N}
    assert (status["connections"], status["ok"], status["broken"]) == (N, N, 0)
    assert status["causes"] == {}
    conns = r["connections"]
    assert len(conns) == 2 * N
    for c in conns:
        name = "prod/export" if c["service"]["ip"] == EXPORT else "prod/status"
        assert c["service"] == {"ip": c["service"]["ip"], "port": 80, "name": name}
        if name == "prod/export":
            assert c["verdict"] == "broken"
            assert c["break"]["cause"] == "bridge-nf-call-iptables-off"
            assert (c["break"]["netns"], c["break"]["dev"]) == ("node", "cni0")
        else:
            assert c["verdict"] == "ok" and c["backend"]["ip"] == "100.96.54.1"
    assert "by Service" in res.stderr and "prod/status 100.67.30.134:80/tcp" in res.stderr
