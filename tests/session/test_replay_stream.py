"""Streamed replay: the same report, summary and exit status as the in-memory replay,
without holding the session's events."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from tests.session.helpers import write_fixture
from tracer import cli_session
from tracer.analysis.finalize import Finished
from tracer.present import live
from tracer.present.report import build
from tracer.present.reportfile import ReportWriter
from tracer.session import open_session, replay
from tracer.session.replay import replay_stream, run_info
from tracer.session.synth import synthesize

ROOT = Path(__file__).resolve().parent.parent.parent
FAULTS = ROOT / "tests" / "fixtures" / "faults"


def _streamed(path: Path) -> tuple[str, str]:
    """(the report's text, the summary) of a streamed replay."""
    digest = live.new_digest()
    report = io.BytesIO()
    writer = ReportWriter(report)
    head = open_session(path)
    writer.begin(run_info(head.header, head.footer, 0))

    def take(done: Finished) -> None:
        writer.add(done.conn, done.diag)
        digest.add(*done)

    res = replay_stream(path, take)
    writer.end(res.run)
    summary = io.StringIO()
    live.render_digest(res.run, digest, Console(file=summary, width=200))
    return report.getvalue().decode(), summary.getvalue()


def _in_memory(path: Path) -> tuple[str, str]:
    res = replay(path)
    summary = io.StringIO()
    live.render_summary(res, Console(file=summary, width=200))
    return json.dumps(build(res.run, res.results), indent=2) + "\n", summary.getvalue()


@pytest.mark.parametrize("name", sorted(p.name for p in FAULTS.glob("*.hts")))
def test_streamed_report_and_summary_are_the_in_memory_ones(name: str) -> None:
    assert _streamed(FAULTS / name) == _in_memory(FAULTS / name)


@pytest.mark.parametrize("name", ["seed-broken.json", "seed-healthy.json"])
def test_seed_sessions_stream_the_same(name: str, tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    write_fixture(name, path, batch=8)
    assert _streamed(path) == _in_memory(path)


def test_unfinished_recording_streams_with_end_from_the_last_event(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    write_fixture("seed-broken.json", path, batch=10, footer=False)
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03")  # a chunk header cut short by SIGKILL
    res = replay_stream(path, lambda _done: None)
    mem = replay(path)
    assert res.warnings == mem.warnings and len(res.warnings) == 2
    assert res.context.end_ns == mem.context.end_ns and res.run == mem.run
    assert _streamed(path) == _in_memory(path)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "big.hts"
    synthesize([FAULTS / "two-node.hts", FAULTS / "none.hts"], path, events=20_000)
    return path


def test_synthetic_session_streams_the_same(synthetic: Path) -> None:
    res = replay_stream(synthetic, lambda _done: None)
    assert res.stats.connections == 150 == res.stats.fast_connections
    assert res.stats.max_open_connections <= res.stats.connections
    assert _streamed(synthetic) == _in_memory(synthetic)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tracer.cli", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_streamed_replay_gives_the_in_memory_report(synthetic: Path) -> None:
    streamed = _cli("replay", str(synthetic), "--json", "-", "--stream")
    in_memory = _cli("replay", str(synthetic), "--json", "-", "--no-stream")
    assert streamed.returncode == in_memory.returncode == 0, streamed.stderr
    assert json.loads(streamed.stdout) == json.loads(in_memory.stdout)
    assert streamed.stdout == in_memory.stdout and streamed.stderr == in_memory.stderr
    assert len(json.loads(streamed.stdout)["connections"]) == 150


def test_cli_broken_session_streams_with_exit_status_3(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = _cli("replay", str(FAULTS / "bridge-nf-off.hts"), "--json", str(out), "--stream")
    assert res.returncode == 3, res.stderr
    report = json.loads(out.read_text())
    assert report["connections"][0]["break"]["cause"] == "bridge-nf-call-iptables-off"


def test_cli_streams_big_sessions_by_default(
    synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def in_memory(_path: object) -> None:
        raise AssertionError("a big session was replayed in memory")

    monkeypatch.setattr(cli_session, "STREAM_ABOVE", synthetic.stat().st_size - 1)
    monkeypatch.setattr("tracer.session.replay", in_memory)
    res = CliRunner().invoke(cli_session.replay, [str(synthetic), "--json", "-"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["events"] == 20_520 and len(report["connections"]) == 150
