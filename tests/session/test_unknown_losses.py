"""A recording without its footer (cut short, or still being written) does not know its
losses: the report says null and why, the summary says unknown, never 0; both replay
paths agree byte for byte; a complete recording keeps its numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.loader import load
from tests.session.helpers import batches, fixture_footer, fixture_header, records
from tracer.session import SessionWriter, open_session, replay
from tracer.session.replay import NO_FOOTER
from tracer.session.synth import synthesize

ROOT = Path(__file__).resolve().parent.parent.parent
FAULTS = ROOT / "tests" / "fixtures" / "faults"
FOOTER_COUNTS = (
    "lost_events",
    "lost_by_point",
    "data_budget",
    "over_budget_events",
    "over_budget_by_point",
)


def _cut(src: Path, dst: Path, *, killed: bool = True) -> int:
    """dst: src's header and event chunks without its footer, as a recorder leaves them
    when killed (then with a chunk header cut short) or while it still writes. The
    number of events kept."""
    reader = open_session(src)
    n = 0
    with SessionWriter(dst, reader.header) as w:  # leaving `with`: no footer
        for batch in reader.record_batches():
            w.write_records(batch)
            n += len(batch)
    if killed:
        with open(dst, "ab") as f:
            f.write(b"\x01\x02\x03")
    return n


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tracer.cli", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _replay(path: Path, mode: str) -> tuple[str, str, int]:
    """(report text, summary, exit status) of `hairtrace replay path --json -` in mode."""
    p = _cli("replay", str(path), "--json", "-", mode)
    assert p.returncode in (0, 3), p.stderr
    return p.stdout, p.stderr, p.returncode


@pytest.mark.parametrize("killed", [True, False], ids=["killed", "still-writing"])
@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_cut_recording_reports_losses_unknown(tmp_path: Path, mode: str, killed: bool) -> None:
    path = tmp_path / "cut.hts"
    kept = _cut(FAULTS / "bridge-nf-off.hts", path, killed=killed)
    text, summary, status = _replay(path, mode)
    report = json.loads(text)
    assert {k: report[k] for k in FOOTER_COUNTS} == dict.fromkeys(FOOTER_COUNTS)
    assert report["lost_events_unknown"] == NO_FOOTER
    assert report["rule_drops"] is None, "read at the end: unknown, not none"
    assert report["events"] == kept > 0
    assert f"{kept} events, events lost: unknown ({NO_FOOTER})" in summary
    assert "0 lost" not in summary and "LOST" not in summary
    assert status == 3 and report["connections"][0]["verdict"] == "broken"


def test_both_paths_give_the_same_report_and_summary_for_a_cut_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.hts"
    _cut(FAULTS / "bridge-nf-off.hts", path)
    assert _replay(path, "--stream") == _replay(path, "--no-stream")


@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_complete_recording_reports_its_numbers(tmp_path: Path, mode: str) -> None:
    src = FAULTS / "bridge-nf-off.hts"
    footer = open_session(src).footer
    assert footer is not None and footer.lost_events == 0
    text, summary, _status = _replay(src, mode)
    report = json.loads(text)
    assert (report["lost_events"], report["lost_by_point"]) == (0, {})
    assert report["over_budget_events"] == footer.over_budget_events
    assert report["data_budget"] == footer.data_budget
    assert report["lost_events_unknown"] is None
    assert report["rule_drops"] == []
    assert f"{report['events']} events, 0 lost" in summary and "unknown" not in summary
    assert all("no footer" not in n for c in report["connections"] for n in c["notes"])


def _with_losses(tmp_path: Path) -> Path:
    """The seed recording, finished, with a footer that counts losses (no loss windows:
    the verdicts stay those of the recorded events)."""
    fx = load("seed-broken.json")
    path = tmp_path / "lossy.hts"
    footer = replace(
        fixture_footer(fx),
        lost_events=3,
        lost_by_point={"netif_receive_skb": 3},
        data_budget=8,
        over_budget_events=2,
        over_budget_by_point={"net_dev_start_xmit": 2},
        loss_windows=(),
    )
    with SessionWriter(path, fixture_header(fx)) as w:
        for b in batches(records(fx), 10):
            w.write_records(b)
        w.close(footer)
    return path


@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_complete_recording_with_losses_reports_them(tmp_path: Path, mode: str) -> None:
    text, summary, _status = _replay(_with_losses(tmp_path), mode)
    report = json.loads(text)
    assert {k: report[k] for k in FOOTER_COUNTS} == {
        "lost_events": 3,
        "lost_by_point": {"netif_receive_skb": 3},
        "data_budget": 8,
        "over_budget_events": 2,
        "over_budget_by_point": {"net_dev_start_xmit": 2},
    }
    assert report["lost_events_unknown"] is None
    assert "3 LOST (netif_receive_skb 3)" in summary and "unknown" not in summary


@pytest.fixture(scope="module")
def spread(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a finished recording of 16 connections 0.5 s apart, the same without footer)."""
    root = tmp_path_factory.mktemp("spread")
    full, cut = root / "full.hts", root / "cut.hts"
    per = sum(len(b) for b in open_session(FAULTS / "none.hts").record_batches())
    synthesize([FAULTS / "none.hts"], full, events=16 * per, period_ns=500_000_000)
    _cut(full, cut)
    return full, cut


def _by_client(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {c["client"]["port"]: c for c in report["connections"]}


def test_only_connections_seen_near_the_end_get_a_note(spread: tuple[Path, Path]) -> None:
    full, cut = spread
    whole, part = replay(full), replay(cut)
    end = part.context.end_ns
    noted = 0
    for (c, d), (c2, d2) in zip(whole.results, part.results, strict=True):
        assert (c.key, d.verdict, d.brk) == (c2.key, d2.verdict, d2.brk)  # verdicts stay
        near = end - c2.last_ns <= part.context.reply_timeout_ns
        assert d2.notes == (d.notes + d2.notes[-1:] if near else d.notes)
        if near:
            noted += 1
            assert "has no footer: later events of it may be missing" in d2.notes[-1]
    assert 0 < noted < len(part.results) == 16


def test_spread_cut_recording_streams_the_same(spread: tuple[Path, Path]) -> None:
    _full, cut = spread
    streamed, in_memory = _replay(cut, "--stream"), _replay(cut, "--no-stream")
    assert streamed == in_memory
    notes = [n for c in json.loads(streamed[0])["connections"] for n in c["notes"]]
    assert 0 < len(notes) < 16


def test_diff_of_a_report_with_unknown_losses_works(tmp_path: Path) -> None:
    src = FAULTS / "bridge-nf-off.hts"
    cut = tmp_path / "cut.hts"
    _cut(src, cut)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(_replay(cut, "--no-stream")[0])
    b.write_text(_replay(src, "--no-stream")[0])
    assert json.loads(a.read_text())["lost_events"] is None
    for x, y in ((a, b), (b, a)):
        p = _cli("diff", str(x), str(y), "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["equivalent"] is True
    p = _cli("diff", str(a), str(b))
    assert p.returncode == 0 and "result: equivalent" in p.stdout, p.stderr
    assert "A's event losses are unknown" in p.stdout, p.stdout
    side = json.loads(_cli("diff", str(a), str(b), "--json").stdout)
    assert side["a"]["lost_events"] is None and side["b"]["lost_events"] == 0
