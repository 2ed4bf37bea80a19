"""The export's conn and direction columns are the JSON report's connections.

The analysis engine decides what a connection is (one handshake: a reused 4-tuple
with a new ISN is a new connection, docs/connections.md); the export must say, for
every event, which of the report's connections it is a hop of, and on which side.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tracer.analysis.finalize import Finished
from tracer.events.codec import encode
from tracer.events.model import ACK, Event
from tracer.session import SessionWriter, load_events, open_session, replay
from tracer.session.columns import flags_text
from tracer.session.export import _Members
from tracer.session.format import FORMAT_MINOR

FAULTS = Path(__file__).resolve().parent.parent / "fixtures" / "faults"
SESSIONS = sorted(FAULTS.glob("*.hts"))

Hop = tuple[Any, ...]  # what a hop and an export row have in common


def write_events(
    path: Path,
    events: list[Event],
    like: Path,
    *,
    chunk: int = 50,
    header: dict[str, Any] | None = None,
    footer: dict[str, Any] | None = None,
) -> None:
    """A session of events (ids already per-trace ones) with the header and footer of
    session `like`, fields changed as given."""
    reader = open_session(like)
    assert reader.footer is not None
    end = max(ev.ts_ns for ev in events) + 1_000_000_000
    last = replace(reader.footer, end_ns=end, events=len(events), loss_windows=())
    first = replace(reader.header, format_minor=FORMAT_MINOR, **(header or {}))
    records = [encode(ev) for ev in events]
    with SessionWriter(path, first) as w:
        for i in range(0, len(records), chunk):
            w.write_records(records[i : i + chunk])
        w.close(replace(last, **(footer or {})))


def report_hops(path: Path) -> list[Counter[Hop]]:
    """Per connection of the JSON report (its index): its packets' hops, with direction."""
    out = []
    for conn, _diag in replay(path).results:
        hops: Counter[Hop] = Counter()
        for p in conn.packets:
            for h in p.hops:
                # the export has the events as recorded: an ICMP error's tuple is the one
                # it quotes (its hop has it reversed), a datagram's seq its length; an
                # error's own addresses (its seq and ack) change hop by hop: left out
                t = h.tuple.reversed() if p.role == "ICMP" else h.tuple
                seq = p.length if p.role == "UDP" else None if p.role == "ICMP" else p.seq
                ack = None if p.role == "ICMP" else p.ack_seq
                hops[(h.ts_ns, h.point, h.netns, h.dev or None, t.src, t.sport, t.dst, t.dport,
                      flags_text(p.tcp_flags), seq, ack, p.ip_id, p.direction)] += 1  # fmt: skip
        out.append(hops)
    return out


def export_hops(df: pd.DataFrame) -> dict[int, Counter[Hop]]:
    """Per conn value of an export: its rows, as report_hops() has them."""
    out: dict[int, Counter[Hop]] = {}
    for r in df[df.conn.notna()].itertuples():
        icmp = r.proto == 1
        hop = (r.ts_ns, r.point, r.netns, r.dev if isinstance(r.dev, str) else None, r.src,
               r.sport, r.dst, r.dport, r.tcp_flags, None if icmp else r.seq,
               None if icmp else r.ack, r.ip_id, r.direction)  # fmt: skip
        out.setdefault(int(r.conn), Counter())[hop] += 1
    return out


def assert_conn_is_the_report(path: Path) -> pd.DataFrame:
    df = load_events(path)
    expected = report_hops(path)
    got = export_hops(df)
    assert sorted(got) == list(range(len(expected)))
    for i, hops in enumerate(expected):
        assert got[i] == hops, f"connection {i}"
    assert df.direction.isna().equals(df.conn.isna())  # a direction exactly where a conn
    return df


@pytest.mark.parametrize("path", SESSIONS, ids=[p.stem for p in SESSIONS])
def test_conn_and_direction_are_the_reports_connections(path: Path) -> None:
    df = assert_conn_is_the_report(path)
    assert df.conn.notna().any()


def reused_port(source: Path, gap_ns: int = 500_000_000, isn_step: int = 0x10000) -> list[Event]:
    """source's events, then a copy of them gap_ns after its last one: the same client
    4-tuple with another ISN (every sequence number of the client's side moved by
    isn_step, the acks of the other side too) and its own skb and conntrack ids."""
    events = replay(source).events
    sides = load_events(source).direction.tolist()
    first, last = min(ev.ts_ns for ev in events), max(ev.ts_ns for ev in events)
    shift = last - first + gap_ns
    top = max(max(ev.skb for ev in events), max(ev.ct.id for ev in events if ev.ct)) + 1

    def again(ev: Event, side: Any) -> Event:
        seq, ack = ev.seq, ev.ack_seq
        if side == "original":
            seq = (seq + isn_step) % 2**32
        elif side == "reply" and ev.tcp_flags & ACK:
            ack = (ack + isn_step) % 2**32
        ct = replace(ev.ct, id=ev.ct.id + top) if ev.ct is not None else None
        return replace(ev, ts_ns=ev.ts_ns + shift, seq=seq, ack_seq=ack, skb=ev.skb + top, ct=ct)

    return events + [again(ev, side) for ev, side in zip(events, sides, strict=True)]


def test_a_reused_port_with_a_new_isn_is_a_second_connection(tmp_path: Path) -> None:
    source = FAULTS / "none.hts"
    path = tmp_path / "reused.hts"
    events = reused_port(source)
    write_events(path, events, source)
    res = replay(path)
    assert len(res.results) == 2 and res.results[0][0].key == res.results[1][0].key
    assert res.results[0][0].isn != res.results[1][0].isn
    df = assert_conn_is_the_report(path)
    key = res.results[0][0].key
    client = df[(df.src == key.src) & (df.sport == key.sport) & (df.dst == key.dst)]
    half = len(events) // 2
    assert set(client.conn[client.index < half]) == {0}
    assert set(client.conn[client.index >= half]) == {1}
    # the copy is the same connection again, event for event
    first, second = df.iloc[:half].reset_index(drop=True), df.iloc[half:].reset_index(drop=True)
    assert first.direction.equals(second.direction)
    assert (first.conn.isna() == second.conn.isna()).all()


def test_membership_makes_room_for_events_recorded_after_the_file_was_opened() -> None:
    """A session still being recorded holds more events when the engine reads it."""
    gathered = _Members(2)
    gathered.members((5, 1, 0), np.array([0, 6]), np.array([False, True]))
    gathered.members((5, 2, 1), np.array([1]), np.array([True]))
    gathered.sink(Finished((5, 1, 0), None, None))  # type: ignore[arg-type]
    gathered.sink(Finished((5, 2, 1), None, None))  # type: ignore[arg-type]
    assert gathered.conn[:7].tolist() == [0, 1, -1, -1, -1, -1, 0]
    assert gathered.direction[:7].tolist() == [0, 1, -1, -1, -1, -1, 1]
    assert not gathered.waiting


def test_a_port_reused_after_its_claims_were_released_keeps_every_event(
    tmp_path: Path,
) -> None:
    """The second connection comes after the first one's tuple claims were released
    (idle_ns): its events after DNAT, which only its conntrack entry ties to it, still
    join it (none is left unmatched), as many as the first one had."""
    from tracer.session.replay import replay_stream

    source = FAULTS / "none.hts"
    path = tmp_path / "reused-late.hts"
    write_events(path, reused_port(source, gap_ns=60_000_000_000), source)
    done: list[Any] = []
    res = replay_stream(path, done.append)
    assert res.stats.unmatched_events == 0
    first, second = (sum(len(p.hops) for p in f.conn.packets) for f in done)
    assert len(done) == 2 and first == second
    assert_conn_is_the_report(path)
