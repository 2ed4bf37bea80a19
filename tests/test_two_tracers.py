"""Two tracers on one node netns at the same time: both attach, both diagnose.

The kernel allows one BPF netfilter link per (netns, hook, priority), so the
second tracer must take the next free priority of each window (issue 17). The
lab is scripts/seed-lab.sh (netns node, pods poda and podb, bridge-nf-call-iptables=0).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_live

from tracer.kernel.nfholders import nf_links

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
    f"http://{SVC}/",
]
FIRST_CHOICES = [(0, -199), (0, -99), (1, 101), (2, 1), (3, -199), (3, -99), (4, 101)]

pytestmark = pytest.mark.live


def _lab(action: str, *args: str) -> None:
    subprocess.run(
        ["bash", str(SEED_LAB), action, *args], check=True, capture_output=True, timeout=60
    )


@pytest.fixture
def seed_lab() -> Iterator[None]:
    needs_live()
    _lab("down")
    _lab("up", "0")
    try:
        yield
    finally:
        _lab("down")


def _tracer(report: Path, ready: Path, *cmd: str) -> subprocess.Popen[str]:
    args = ["--no-live", "--svc", SVC, "--netns", "node", "--json", str(report)]
    return subprocess.Popen(
        [sys.executable, "-m", "tracer.cli", *args, "--ready-file", str(ready), *cmd],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(proc: subprocess.Popen[str], ready: Path) -> None:
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "tracer never attached"
        time.sleep(0.05)


def _held(pid: int) -> list[tuple[int, int]]:
    return sorted((link.hook, link.priority) for link in nf_links() if link.pid == pid)


def _assert_seed_diagnosis(report: Path) -> None:
    r = json.loads(report.read_text())
    assert r["lost_events"] == 0 and r["events"] > 0
    [conn] = [c for c in r["connections"] if c["verdict"] == "broken"]
    assert conn["client"]["ip"] == "100.96.54.240"
    assert conn["backend"] == {"ip": "100.96.54.247", "port": 80, "pod": None}
    assert conn["break"]["cause"] == "bridge-nf-call-iptables-off"
    assert conn["break"]["netns"] == "node" and conn["break"]["dev"] == "cni0"


def test_two_tracers_on_one_netns_both_diagnose(seed_lab: None, tmp_path: Path) -> None:
    r1, r2 = tmp_path / "r1.json", tmp_path / "r2.json"
    ready1, ready2 = tmp_path / "ready1", tmp_path / "ready2"
    t1 = _tracer(r1, ready1, "--duration", "120")
    t2: subprocess.Popen[str] | None = None
    try:
        _wait_ready(t1, ready1)
        assert _held(t1.pid) == FIRST_CHOICES, "one tracer attaches where it always did"
        t2 = _tracer(r2, ready2, "--", *CURL)
        _wait_ready(t2, ready2)
        # while curl runs: the second tracer sits next to the first in every window
        assert _held(t2.pid) == sorted((hook, prio + 1) for hook, prio in FIRST_CHOICES)
        _out, err2 = t2.communicate(timeout=60)
        assert t2.returncode == 3, err2
        assert _held(t1.pid) == FIRST_CHOICES, "the first tracer kept its links"
        time.sleep(0.3)
        t1.send_signal(signal.SIGINT)
        _out, err1 = t1.communicate(timeout=30)
    finally:
        for proc in (t1, t2):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert t1.returncode == 3, err1
    assert "Traceback" not in err1 + err2
    _assert_seed_diagnosis(r1)
    _assert_seed_diagnosis(r2)
    assert json.loads(r1.read_text())["attached"] == json.loads(r2.read_text())["attached"]
    # each report says where its netfilter programs really sat
    p1 = json.loads(r1.read_text())["netfilter_priorities"]
    p2 = json.loads(r2.read_text())["netfilter_priorities"]
    assert p1["ht_nf_pre_ct"] == -199 and p2["ht_nf_pre_ct"] == -198
    assert all(p2[name] == prio + 1 for name, prio in p1.items()), (p1, p2)
