"""A rotating recording of healthy traffic with a broken phase: ordinary segments are
deleted past --record-keep, every segment with a broken connection's events stays, and
replaying the kept segments finds every broken connection the live trace found."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_live

from tracer.session import open_session, replay

ROOT = Path(__file__).resolve().parent.parent
SVC = "100.67.30.133"
pytestmark = pytest.mark.live

# 4 s healthy, 3 calls with bridge-nf-call-iptables=0 (each times out after 1 s), then
# 40 s healthy: longer than the engine's idle limit (31 s), so that the segments from
# before the break are decided while the trace runs, not only at its end
CLIENT = """
call() { ip netns exec poda curl -s -o /dev/null -m 1 http://{svc}/ || fail=$((fail+1)); }
fail=0
end=$((SECONDS+4)); while [ $SECONDS -lt $end ]; do call; sleep 0.1; done
ip netns exec node sysctl -qw net.bridge.bridge-nf-call-iptables=0
call; call; call
sleep 0.5
ip netns exec node sysctl -qw net.bridge.bridge-nf-call-iptables=1
end=$((SECONDS+40)); while [ $SECONDS -lt $end ]; do call; sleep 0.1; done
echo $fail > {out}
"""


def key(c: dict) -> tuple[int, int | None]:
    return c["client"]["port"], c["isn"]


def test_rotation_keeps_every_broken_connection(tmp_path: Path) -> None:
    needs_live()
    lab = ["bash", str(ROOT / "scripts" / "seed-lab.sh")]
    session, report, fails = tmp_path / "soak.hts", tmp_path / "live.json", tmp_path / "fails"
    client = CLIENT.replace("{svc}", SVC).replace("{out}", str(fails))
    subprocess.run([*lab, "down"], check=True, capture_output=True)
    subprocess.run([*lab, "up", "1"], check=True, capture_output=True)
    deleted_while_running = 0  # what the index said before the trace ended
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tracer.cli", "--no-live", "--svc", SVC, "--netns", "node",
             "--record", str(session), "--record-rotate", "64K", "--record-keep", "1",
             "--json", str(report), "--", "bash", "-c", client],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        while proc.poll() is None and not fails.exists():
            with contextlib.suppress(OSError, ValueError):
                now = json.loads((tmp_path / "soak.segments.json").read_text())["deleted"]
                deleted_while_running = max(deleted_while_running, now)
            time.sleep(0.5)
        _out, err = proc.communicate(timeout=120)
    finally:
        subprocess.run([*lab, "down"], check=True, capture_output=True)
    assert proc.returncode == 3, err
    live = json.loads(report.read_text())
    failed = int(fails.read_text())
    broken = {key(c) for c in live["connections"] if c["verdict"] == "broken"}
    assert failed == 3 and len(broken) == failed
    assert all(isn is not None for _port, isn in broken)

    index = json.loads((tmp_path / "soak.segments.json").read_text())
    final = open_session(session).footer
    assert final is not None and final.recording is not None
    assert final.recording["segments"] == index["segments"]
    # the live report says which segments exist, as the index does at the end
    assert live["recording"]["segments"] == index["segments"]
    assert live["recording"]["deleted"] == index["deleted"]
    files = sorted(p.name for p in tmp_path.glob("soak*.hts"))
    segs = index["segments"]
    assert sorted(s["file"] for s in segs) == files
    # ordinary segments were deleted beyond the keep count, some while the trace ran
    assert index["deleted"] >= 5
    assert not any((tmp_path / s["file"]).exists() for s in index["deleted_latest"])
    assert deleted_while_running >= 3
    kept = [s for s in segs if s["state"] == "kept"]
    closed = [s for s in segs if s["state"] == "closed"]
    assert kept and len(closed) == 1 and segs[-1]["state"] == "current"
    assert all(s["evidence"] for s in kept)

    # every kept segment replays on its own; together they hold every broken connection
    found: dict[tuple[int, int | None], set[str]] = {}
    seen_mid = 0
    for s in segs:
        r = replay(tmp_path / s["file"])
        assert r.footer is not None and not r.warnings, r.warnings
        for conn, diag in r.results:
            found.setdefault((conn.key.sport, conn.isn), set()).add(diag.verdict)
            seen_mid += conn.first_seen_mid_connection
    assert broken <= set(found), (broken, found)
    assert all("broken" in found[k] for k in broken), {k: found[k] for k in broken}
    # and the kept (evidence) segments alone hold them
    in_kept: set[tuple[int, int | None]] = set()
    for s in kept:
        in_kept |= {(c.key.sport, c.isn) for c, _ in replay(tmp_path / s["file"]).results}
    assert broken <= in_kept
    if os.environ.get("HT_ROTATE_DEBUG"):
        print(json.dumps(index, indent=1), deleted_while_running, seen_mid, found)
