"""Rotating recordings: the limit, the policy that keeps evidence, the segment files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fixtures.loader import load
from tests.session.helpers import fixture_footer, fixture_header, records, tiny_topology
from tracer.errors import UsageError
from tracer.session import open_session, replay
from tracer.session.rotate import (
    RotatingWriter,
    RotationPolicy,
    Segment,
    existing,
    index_path,
    parse_limit,
    segment_path,
)

S = 1_000_000_000
IDLE = 31 * S


# ------------------------------------------------------------------ the limit


@pytest.mark.parametrize(
    ("text", "size", "seconds"),
    [
        ("64K", 64 << 10, None),
        ("500M", 500 << 20, None),
        ("2G", 2 << 30, None),
        ("1.5G", 3 << 29, None),
        ("500MB", 500 << 20, None),
        ("500MiB", 500 << 20, None),
        ("1048576", 1 << 20, None),
        ("90s", None, 90),
        ("30m", None, 1800),
        ("6h", None, 6 * 3600),
        ("1d", None, 86400),
    ],
)
def test_limits(text: str, size: int | None, seconds: float | None) -> None:
    lim = parse_limit(text)
    assert (lim.bytes, lim.seconds) == (size, seconds)


@pytest.mark.parametrize("text", ["", "M", "5q", "-1G", "100", "0s", "0.5s", "1y", "2 GB x"])
def test_bad_limits(text: str) -> None:
    with pytest.raises(UsageError, match="--record-rotate"):
        parse_limit(text)


def test_names(tmp_path: Path) -> None:
    assert segment_path(Path("/d/run.hts"), 7) == Path("/d/run.0007.hts")
    assert segment_path(Path("/d/run"), 12) == Path("/d/run.0012")
    assert index_path(Path("/d/run.hts")) == Path("/d/run.segments.json")
    (tmp_path / "run.0003.hts").write_text("")
    (tmp_path / "run.x.hts").write_text("")
    assert existing(tmp_path / "run.hts") == [tmp_path / "run.0003.hts"]


# ------------------------------------------------------------------ the policy


def closed(policy: RotationPolicy, lo: int, hi: int) -> Segment:
    """A segment with events from lo to hi seconds, closed at hi; the next one opened."""
    seg = policy.current
    seg.add_span(lo * S, hi * S, 10)
    policy.close_current(hi * S)
    policy.open(hi * S)
    return seg


def five(keep: int = 1) -> tuple[RotationPolicy, list[Segment]]:
    p = RotationPolicy(keep, IDLE)
    p.open(0)
    return p, [closed(p, i * 10, i * 10 + 9) for i in range(5)]  # 0-9, 10-19, ... 40-49


def test_only_segments_past_the_window_are_due() -> None:
    p, segs = five(keep=2)
    assert p.due() == segs[:3]
    assert RotationPolicy(9, IDLE).due() == []


def test_nothing_is_decided_before_its_events_settle() -> None:
    p, segs = five()
    # the engine grouped events up to 35 s: segment 0 (last event 9 s) waits for 9 + 31
    assert p.decide(35 * S, None, 0) == []
    assert [s.state for s in segs] == ["closed"] * 5
    assert p.decide(40 * S, None, 0) == [segs[0]]
    assert segs[0].state == "deleted" and segs[0] not in p.segments
    assert p.deleted_total == 1 and p.deleted == [segs[0]]


def test_an_open_connection_holds_every_segment_it_may_have_events_in() -> None:
    p, segs = five()
    # a connection open since 15 s: segment 1 (10-19) may hold its events, 0 does not
    decided = p.decide(100 * S, 15 * S, 0)
    assert decided == [segs[0]]
    assert segs[1].state == segs[2].state == segs[3].state == "closed"
    # it started at 19 s exactly: still held (its first event is segment 1's last)
    assert p.decide(100 * S, 19 * S, 0) == []
    # it was judged broken from 15 to 52 s: every segment it overlaps is kept
    p.judged(15 * S, 52 * S, "broken")
    decided = p.decide(100 * S, None, 1)
    assert decided == segs[1:4]
    assert [s.state for s in segs[1:4]] == ["kept"] * 3
    assert segs[1].evidence == {"broken": 1}
    assert "1 broken" in segs[1].reason()
    assert segs[4].state == "closed"  # in the window: kept whatever it holds
    assert p.current.evidence == {}  # the current one had no event yet


def test_ok_connections_mark_nothing_and_other_verdicts_do() -> None:
    p, segs = five()
    p.judged(0, 60 * S, "ok")
    p.judged(21 * S, 21 * S, "recovered")
    p.judged(32 * S, 33 * S, "incomplete")
    p.judged(33 * S, 33 * S, "broken")
    p.finish(0)
    assert [s.state for s in segs] == ["deleted", "deleted", "kept", "kept", "closed"]
    assert segs[3].evidence == {"incomplete": 1, "broken": 1}


def test_a_judgment_between_two_segments_marks_neither() -> None:
    p, segs = five()
    p.judged(19 * S + 1, 20 * S - 1, "broken")  # no segment has events then
    p.finish(0)
    assert [s.state for s in segs[:4]] == ["deleted"] * 4


def test_an_empty_segment_is_deleted_at_once() -> None:
    p = RotationPolicy(0, IDLE)
    p.open(0)
    seg = p.current
    p.close_current(S)
    p.open(S)
    assert p.decide(0, 0, 0) == [seg] and seg.state == "deleted"


def test_keep_zero_keeps_only_evidence() -> None:
    p, segs = five(keep=0)
    p.judged(42 * S, 43 * S, "broken")
    p.finish(0)
    assert [s.state for s in segs] == ["deleted"] * 4 + ["kept"]


# ------------------------------------------------------------------ the files


def stamped(raw: bytes, ts_ns: int) -> bytes:
    return ts_ns.to_bytes(8, "little") + raw[8:]


def make_writer(path: Path, limit: str, keep: int) -> tuple[RotatingWriter, list[int]]:
    fx = load("seed-broken.json")
    header = fixture_header(fx, tiny_topology())
    clock = [header.start_ns]

    def header_at(seq: int, now: int) -> object:
        return replace(header, start_ns=now)

    def footer_at(seg: Segment, now: int) -> object:
        return replace(fixture_footer(fx), end_ns=now, events=seg.events, loss_windows=())

    w = RotatingWriter(path, parse_limit(limit), keep, IDLE, header_at, footer_at,  # type: ignore[arg-type]
                       clock=lambda: clock[0])  # fmt: skip
    return w, clock


def test_segments_are_complete_sessions(tmp_path: Path) -> None:
    path = tmp_path / "run.hts"
    raw = records(load("seed-broken.json"))[0]
    w, clock = make_writer(path, "8K", keep=1)
    t0 = clock[0]
    for i in range(20):  # 200 records of 128 bytes, 10 a batch, one batch a second
        clock[0] = t0 + i * S
        w.write_records([stamped(raw, t0 + i * S + j) for j in range(10)])
    closed = sorted(p.name for p in tmp_path.glob("run.0*.hts"))
    assert len(closed) >= 3 and path.exists()  # 25 KiB of records, a segment per 8 KiB
    w.judged([(t0 + 0, t0 + 1, "broken")])  # in segment 1 only
    w.close(fixture_footer(load("seed-broken.json")))
    kept = sorted(p.name for p in tmp_path.glob("run.0*.hts"))
    # 1: evidence; the last closed one: the window (keep 1); between them: deleted
    assert kept == [closed[0], closed[-1]]
    total = 0
    for name in [*kept, "run.hts"]:
        r = open_session(tmp_path / name)
        assert r.footer is not None and not r.warnings
        n = sum(len(b) for b in r.record_batches())
        assert r.footer.events == n
        total += n
    assert total + sum(s.events for s in w.policy.deleted) == 200 == w.events
    index = json.loads(index_path(path).read_text())
    assert [s["file"] for s in index["segments"]] == [*kept, "run.hts"]
    assert [s["state"] for s in index["segments"]] == ["kept", "closed", "current"]
    assert "1 broken" in index["segments"][0]["why"]
    assert index["deleted"] == len(closed) - 2
    assert [s["file"] for s in index["deleted_latest"]] == closed[1:-1]
    final = open_session(path).footer
    assert final is not None and final.recording is not None
    assert final.recording == {k: index[k] for k in final.recording}
    # after the close, what the trace puts in its report: the same, not re-measured
    assert w.recording() == final.recording


def test_each_segment_replays_alone(tmp_path: Path) -> None:
    """The seed's broken connection split over two segments: each replays as a session;
    the second sees the connection from the middle (no SYN: isn None)."""
    fx = load("seed-broken.json")
    recs = records(fx)
    path = tmp_path / "seed.hts"
    w, _clock = make_writer(path, "5K", keep=5)
    half = 40  # 5 KiB of records and a header of ~1.4 KiB: rotated; the rest is not
    w.write_records(recs[:half])  # > 4 KiB: rotated
    w.write_records(recs[half:])
    w.close(fixture_footer(fx))
    first, second = replay(tmp_path / "seed.0001.hts"), replay(path)
    assert first.footer is not None and second.footer is not None
    assert len(first.records) + len(second.records) == len(recs)
    assert first.results[0][0].isn is not None
    assert any(c.first_seen_mid_connection for c, _ in second.results)


def test_time_limit(tmp_path: Path) -> None:
    path = tmp_path / "t.hts"
    raw = records(load("seed-broken.json"))[0]
    w, clock = make_writer(path, "2s", keep=9)
    for i in range(5):
        clock[0] += S
        w.write_records([stamped(raw, clock[0])])
    w.close(fixture_footer(load("seed-broken.json")))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t.0001.hts", "t.0002.hts", "t.hts", "t.segments.json"
    ]  # fmt: skip


def test_a_failed_trace_keeps_every_segment(tmp_path: Path) -> None:
    path = tmp_path / "f.hts"
    raw = records(load("seed-broken.json"))[0]
    w, clock = make_writer(path, "4K", keep=0)
    for i in range(3):
        clock[0] += S
        w.write_records([stamped(raw, clock[0] + j) for j in range(40)])
    w.close()  # no footer: the trace failed
    assert sorted(p.name for p in tmp_path.iterdir())[:3] == [
        "f.0001.hts", "f.0002.hts", "f.0003.hts"
    ]  # fmt: skip
    assert open_session(path).footer is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--record-rotate", "64K"], "--record-rotate needs --record FILE"),
        (["--record", "{d}/r.hts", "--record-rotate", "5q"], "unknown unit 'q'"),
        (["--record", "{d}/r.hts", "--record-rotate", "100"], "at least 4096 bytes"),
        (["--record", "{d}/r.hts", "--record-rotate", "1h", "--record-keep", "-1"], "0 or more"),
        (["--record", "{d}/r.hts", "--record-keep", "2"], "--record-keep needs --record-rotate"),
    ],
)
def test_usage_errors(args: list[str], needle: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = [a.replace("{d}", str(tmp_path)) for a in args]
    res = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "--svc", "10.0.0.1", *argv, "--duration", "1"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
