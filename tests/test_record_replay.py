"""Record the seed case live, replay it without root: the same report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import AS_NOBODY, needs_live, nobody_can_run

ROOT = Path(__file__).resolve().parent.parent
SVC = "100.67.30.133"
pytestmark = pytest.mark.live


def cli(*args: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tracer.cli", *args]
    if as_nobody:
        cmd = [*AS_NOBODY, *cmd]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90, cwd=ROOT)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    needs_live()
    lab = ["bash", str(ROOT / "scripts" / "seed-lab.sh")]
    d = tmp_path_factory.mktemp("rec")
    os.chmod(d, 0o755)
    session, report = d / "seed.hts", d / "live.json"
    subprocess.run([*lab, "down"], check=True, capture_output=True)
    subprocess.run([*lab, "up", "0"], check=True, capture_output=True)
    try:
        res = cli(
            "--no-live",
            "--svc",
            SVC,
            "--netns",
            "node",
            "--record",
            str(session),
            "--json",
            str(report),
            "--",
            "ip",
            "netns",
            "exec",
            "poda",
            "curl",
            "-s",
            "-m",
            "3",
            f"http://{SVC}/",
        )
    finally:
        subprocess.run([*lab, "down"], check=True, capture_output=True)
    assert res.returncode == 3, res.stderr
    os.chmod(session, 0o644)
    return session, json.loads(report.read_text())


def test_replay_equals_live(recorded: tuple[Path, dict]) -> None:
    session, live = recorded
    as_nobody = nobody_can_run(f"open({str(session)!r}).close(); import tracer")
    res = cli("replay", str(session), "--json", "-", as_nobody=as_nobody)
    assert res.returncode == 3, res.stderr
    replayed = json.loads(res.stdout)
    assert replayed["connections"] == live["connections"]
    same = {k: v for k, v in live.items() if k not in ("tool_version",)}
    assert {k: replayed[k] for k in same} == same
    assert "bridge-nf-call-iptables-off" in res.stderr


def test_cut_session_replays_with_a_warning(recorded: tuple[Path, dict], tmp_path: Path) -> None:
    session, _ = recorded
    data = session.read_bytes()
    cut = tmp_path / "cut.hts"
    cut.write_bytes(data[: len(data) * 2 // 3])
    res = cli("replay", str(cut), "--json", "-")
    assert "warning" in res.stderr and "Traceback" not in res.stderr
    assert res.returncode in (0, 3)
    assert json.loads(res.stdout)["schema"] == "hairtrace/report@1"


def test_record_refuses_to_overwrite(recorded: tuple[Path, dict]) -> None:
    session, _ = recorded
    res = cli("--svc", SVC, "--record", str(session), "--duration", "1")
    assert res.returncode == 2  # a usage error, like every other bad argument
    assert "exists (use --force to overwrite)" in res.stderr


def test_export_parquet_and_pandas(recorded: tuple[Path, dict], tmp_path: Path) -> None:
    session, live = recorded
    out = tmp_path / "events.parquet"
    res = cli("export", str(session), "--format", "parquet", "--out", str(out))
    assert res.returncode == 0, res.stderr
    import pandas as pd

    from tracer.session import load_connections, load_events

    df = pd.read_parquet(out)
    assert len(df) == live["events"]
    assert len(load_events(session)) == live["events"]
    conns = load_connections(session)
    assert list(conns["verdict"]) == ["broken"]
