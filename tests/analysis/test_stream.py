"""Streaming analysis: the same connections, verdicts and breaks as analyse() over all
events, in memory bounded by the open connections."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.session.helpers import write_fixture
from tracer.analysis import analyse
from tracer.analysis.diagnose import diagnose
from tracer.analysis.finalize import Finished, LazyConnection
from tracer.analysis.stream import StreamAnalyser, analyse_stream
from tracer.events.codec import decode_all
from tracer.events.rows import CODEC, rows_of
from tracer.present.report import build
from tracer.session import replay
from tracer.session.synth import synthesize

FAULTS = Path(__file__).resolve().parent.parent / "fixtures" / "faults"
FAULT_SESSIONS = sorted(p.name for p in FAULTS.glob("*.hts"))
SEEDS = ["seed-broken.json", "seed-healthy.json"]


def _session(name: str, tmp_path: Path) -> Path:
    if name in SEEDS:
        write_fixture(name, tmp_path / "seed.hts", batch=8)
        return tmp_path / "seed.hts"
    return FAULTS / name


def _batches(records: list[bytes], size: int) -> list:  # type: ignore[type-arg]
    return [rows_of(b"".join(records[i : i + size])) for i in range(0, len(records), size)]


@pytest.mark.parametrize("size", [1, 7, 1000])
@pytest.mark.parametrize("name", FAULT_SESSIONS + SEEDS)
def test_streamed_equals_analyse(name: str, size: int, tmp_path: Path) -> None:
    res = replay(_session(name, tmp_path))
    streamed = analyse_stream(_batches(res.records, size), res.context, CODEC)
    assert build(res.run, streamed) == build(res.run, res.results)
    got = [(c.key, c.backend, d.verdict, d.brk, d.notes) for c, d in streamed]
    assert got == [(c.key, c.backend, d.verdict, d.brk, d.notes) for c, d in res.results]


@pytest.mark.parametrize("block", [5, 40])
@pytest.mark.parametrize("name", FAULT_SESSIONS)
def test_events_before_their_conntrack_entry_still_join_it(name: str, block: int) -> None:
    """Records arriving out of order (each block of `block` reversed) within the engine's
    reorder window, in batches of any size: the same report as in time order."""
    res = replay(FAULTS / name)
    recs = [r for i in range(0, len(res.records), block) for r in res.records[i : i + block][::-1]]
    expected = build(res.run, analyse(decode_all(res.records), res.context))
    window = 10_000_000_000  # wider than any block's span in these recordings
    for size in (1, 7):
        got = analyse_stream(_batches(recs, size), res.context, CODEC, reorder_ns=window)
        assert build(res.run, got) == expected


@pytest.mark.parametrize("name", FAULT_SESSIONS)
def test_events_before_their_conntrack_entry_still_join_it_without_reordering(
    name: str,
) -> None:
    """No reorder window, blocks of 5 reversed: events whose tuple only a later conntrack
    entry reveals (after DNAT) wait for it and join its connection."""
    res = replay(FAULTS / name)
    recs = [r for i in range(0, len(res.records), 5) for r in res.records[i : i + 5][::-1]]
    expected = [(c.key, d.verdict) for c, d in analyse(decode_all(res.records), res.context)]
    got = analyse_stream(_batches(recs, 5), res.context, CODEC, reorder_ns=0)
    assert [(c.key, d.verdict) for c, d in got] == expected


def _finished(records: list[bytes], ctx, size: int) -> tuple[StreamAnalyser, list[Finished]]:  # type: ignore[no-untyped-def]
    analyser = StreamAnalyser(ctx, CODEC)
    done: list[Finished] = []
    for rows in _batches(records, size):
        done += analyser.feed(rows)
    done += analyser.finish()
    return analyser, done


@pytest.mark.parametrize("name", FAULT_SESSIONS)
def test_connections_judged_healthy_from_columns_are_ok_by_diagnose(name: str) -> None:
    """The fast path never calls ok what diagnose() would not."""
    res = replay(FAULTS / name)
    analyser, done = _finished(res.records, res.context, 1000)
    fast = [f for f in done if isinstance(f.conn, LazyConnection)]
    assert len(fast) == analyser.fast_connections
    assert all(diagnose(f.conn, res.context) == f.diag for f in fast)
    assert all(f.diag.verdict == "ok" for f in fast)
    if name in ("none.hts", "two-node.hts"):
        assert fast and len(fast) == len(done)  # healthy sessions take the fast path


def test_synthetic_session_equals_analyse(tmp_path: Path) -> None:
    path = tmp_path / "big.hts"
    summary = synthesize([FAULTS / "two-node.hts", FAULTS / "none.hts"], path, events=7000)
    res = replay(path)
    assert len(res.results) == summary.connections == 55
    assert build(res.run, analyse_stream(_batches(res.records, 500), res.context, CODEC)) == (
        build(res.run, res.results)
    )


def test_memory_is_bounded_by_the_open_connections(tmp_path: Path) -> None:
    """A long session of sequential connections: the analyser never holds more than the
    few connections of the last seconds, however long the session."""
    path = tmp_path / "long.hts"
    summary = synthesize([FAULTS / "two-node.hts", FAULTS / "none.hts"], path, events=200_000)
    from tracer.session import open_session
    from tracer.session.replay import context_of

    reader = open_session(path)
    ctx = context_of(reader.header, reader.footer, reader.header.start_ns)
    analyser = StreamAnalyser(ctx, CODEC)
    finished = 0
    most_open = most_held = most_tuples = 0
    records = [r for batch in reader.record_batches() for r in batch]
    for rows in _batches(records, 1000):
        finished += len(analyser.feed(rows))
        most_open = max(most_open, analyser.open_connections)
        most_held = max(most_held, analyser.held_events)
        most_tuples = max(most_tuples, analyser.tracked_tuples)
    finished += len(analyser.finish())
    assert finished == summary.connections > 1400
    assert analyser.max_open_connections <= 50 and most_open <= 50
    assert analyser.max_held_events <= 50 * 150 and most_held <= 50 * 150
    assert analyser.fast_connections == finished
    # the tuple map: 4 tuples of each connection of the last two idle periods (and a second)
    per_second = summary.connections / (summary.span_ns / 1e9)
    assert most_tuples <= 4 * per_second * (2 * analyser.idle_ns / 1e9 + 1) < 4 * finished / 2


def test_a_live_view_peeks_at_open_connections_and_the_clock_closes_them() -> None:
    """peek(): the open connections judged as if the trace ended now (a break shows while
    its connection is still open); advance(t): trace time passed without events, so the
    silent ones are judged, as finish() would have judged them."""
    res = replay(FAULTS / "bridge-nf-off.hts")
    engine = StreamAnalyser(res.context, CODEC)
    done = engine.feed(rows_of(b"".join(res.records)))
    assert done == [] and engine.open_connections == len(res.results)
    last = max(e.ts_ns for e in res.events)
    engine.advance(last + 1)  # not long enough for anything to be over
    peeked = engine.peek()
    assert [(f.conn.key, f.diag.verdict) for f in peeked] == [
        (c.key, d.verdict) for c, d in res.results
    ]
    assert engine.peek() == peeked  # nothing grew: the same verdicts, not judged again
    assert engine.open_connections == len(res.results)  # peeking closes nothing
    closed = engine.advance(last + engine.idle_ns + 1)
    assert [(f.conn.key, f.diag.verdict) for f in closed] == [
        (c.key, d.verdict) for c, d in res.results
    ]
    assert engine.open_connections == 0 and engine.peek() == []
    assert engine.finish() == []


def test_a_nat_clash_keeps_each_flow_its_own_packets() -> None:
    """conntrack-insert-failed: a kept flow and a new one SNATed to the same tuple, their
    entries with one reply tuple. Seen from the new flow's first event on (the trace
    starts just before it: the loser's entry is seen first and claims the tuple), each
    flow keeps its own packets: the loser's post-SNAT request and its drop stay with it,
    the winner's translated packets stay with the winner."""
    from tracer.events.codec import decode, encode

    res = replay(FAULTS / "conntrack-insert-failed.hts")
    events = [decode(r) for r in res.records]
    kept = [e for e in events if e.ct is not None and e.ct.orig.sport == 5300]
    lost = [e for e in events if e.ct is not None and e.ct.orig.sport != 5300]
    assert kept and lost
    start = min(e.ts_ns for e in lost)
    later = [encode(e) for e in events if e.ts_ns >= start]
    for size in (1, 7, 1000):
        conns = {c.key.sport: (c, d) for c, d in analyse_stream(_batches(later, size),
                                                                 res.context, CODEC)}  # fmt: skip
        [loser] = [sport for sport in conns if sport != 5300]
        conn, diag = conns[loser]
        assert (diag.verdict, diag.brk and diag.brk.cause) == ("broken", "conntrack-insert-failed")
        hops = [h for p in conn.packets for h in p.hops]
        assert any(h.kind == "drop" for h in hops)
        assert all(h.ct is None or h.ct.orig.sport == loser for h in hops), "none of the kept flow"
        kept_conn, kept_diag = conns[5300]
        assert kept_diag.verdict == "ok"
        kept_hops = [h for p in kept_conn.packets for h in p.hops]
        assert all(h.ct is None or h.ct.orig.sport == 5300 for h in kept_hops)
