"""The columnar export writes the values the per-event export wrote.

`reference_rows` is the per-event code the export had before it was columnar (one
Event at a time: tracer.session.columns._row of then), kept here as the
definition of every column but conn and direction (tests/session/test_export_conn.py
checks those against the JSON report). CSV and JSON Lines must be the text the csv
and json modules write from those rows, byte for byte; Parquet and load_events the
same values with the declared dtypes.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.session.test_export_conn import FAULTS, SESSIONS, write_events
from tracer.analysis.context import Context
from tracer.analysis.reassemble import role_of
from tracer.events.model import CTINFO_NAMES, NF_HOOKS, Conntrack, Event, Point, Tuple
from tracer.session import export as export_mod
from tracer.session import export_session, load_events, open_session, pandas_dtypes, replay
from tracer.session.columns import NAMES, flags_text
from tracer.session.replay import context_of

Row = tuple[Any, ...]


def _row(
    ev: Event, ctx: Context, start_ns: int, locations: Mapping[int, str], conn: Any, side: Any
) -> Row:
    """One event's row as the per-event export built it (conn and direction given)."""
    info, ct, t = ev.info, ev.ct, ev.tuple
    drop = ctx.drop_reasons.get(ev.reason, f"reason-{ev.reason}") if info.kind == "drop" else None
    return (
        (ev.ts_ns - start_ns) / 1e9,
        ev.ts_ns,
        info.name,
        info.kind,
        ev.netns,
        ctx.names.ns_name(ev.netns),
        ev.dev or None,
        ev.ifindex,
        t.src,
        t.sport,
        t.dst,
        t.dport,
        ev.proto,
        flags_text(ev.tcp_flags),
        ev.seq,
        ev.ack_seq,
        ev.ip_id,
        NF_HOOKS.get(ev.hook),
        f"{ev.skb:#x}",
        f"{ct.id:#x}" if ct else None,
        CTINFO_NAMES.get(ct.ctinfo, str(ct.ctinfo)) if ct else None,
        "|".join(ct.status_names) or "none" if ct else None,
        str(ct.orig) if ct else None,
        str(ct.reply) if ct else None,
        drop,
        ev.aux,
        conn,
        {17: "UDP", 1: "ICMP"}.get(ev.proto) or role_of(ev.tcp_flags),
        side,
        locations.get(ev.location, f"{ev.location:#x}") if ev.location else None,
        ev.inner_proto,
        ev.icmp_type,
        ev.icmp_code,
        ctx.names.pod_of(ev.netns),
    )


def reference_rows(path: Path, conn: list[Any], side: list[Any]) -> list[Row]:
    """Every event of the session, decoded one by one, as the per-event export's rows."""
    reader = open_session(path)
    header, footer = reader.header, reader.footer
    ctx = context_of(header, footer, header.start_ns)
    locations = footer.locations if footer is not None else {}
    events = list(reader.events())
    assert len(events) == len(conn) == len(side)
    return [
        _row(ev, ctx, header.start_ns, locations, c, s)
        for ev, c, s in zip(events, conn, side, strict=True)
    ]


def csv_text(rows: list[Row]) -> bytes:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(NAMES)
    w.writerows(rows)
    return text.getvalue().encode()


def jsonl_text(rows: list[Row]) -> bytes:
    lines = (json.dumps(dict(zip(NAMES, r, strict=True)), separators=(",", ":")) for r in rows)
    return "".join(f"{line}\n" for line in lines).encode()


def exported(path: Path, fmt: str) -> bytes:
    out = io.BytesIO()
    export_session(path, fmt, out)
    return out.getvalue()


def assert_same_values(path: Path) -> None:
    df = load_events(path)
    conn = [None if pd.isna(c) else int(c) for c in df.conn]
    side = [None if pd.isna(s) else s for s in df.direction]
    rows = reference_rows(path, conn, side)
    assert exported(path, "csv") == csv_text(rows)
    assert exported(path, "jsonl") == jsonl_text(rows)
    expected = pd.DataFrame(rows, columns=list(NAMES)).astype(pandas_dtypes())
    back = pd.read_parquet(io.BytesIO(exported(path, "parquet")))
    pd.testing.assert_frame_equal(back, expected, check_categorical=False)
    pd.testing.assert_frame_equal(df, expected, check_categorical=False)


@pytest.mark.parametrize("batch_rows", [7, 65536])
@pytest.mark.parametrize("path", SESSIONS, ids=[p.stem for p in SESSIONS])
def test_every_column_as_the_per_event_export(
    path: Path, batch_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_mod, "BATCH_ROWS", batch_rows)  # batches across chunks
    assert_same_values(path)


def odd_values(events: list[Event]) -> list[Event]:
    """Events whose values take the rare ways through the columns: names to quote or
    escape, unknown points, hooks and ctinfo, drops with and without reason names and
    locations, an event before the trace's start, an empty device name."""
    ct = next(ev.ct for ev in events if ev.ct is not None)
    odd = [
        {"dev": 'we,ir"d'},
        {"dev": "ünï\tx"},
        {"dev": ""},
        {"point": 99},
        {"hook": 7},
        {"ct": Conntrack(ct.id, 0x3FF, 5, ct.orig, Tuple("10.0.0.1", 1, "10.0.0.2", 2))},
        {"point": Point.DROP, "reason": 3, "location": 0x1234},
        {"point": Point.DROP, "reason": 77, "location": 0x999},
        {"point": Point.DROP, "reason": 2},
        {"ts_ns": 5, "location": 0x1234},
    ]
    return [replace(ev, **odd[i]) if i < len(odd) else ev for i, ev in enumerate(events)]


def test_odd_values_as_the_per_event_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = FAULTS / "two-node.hts"
    path = tmp_path / "odd.hts"
    reasons = {3: 'NO,SOCKET "x"', 2: "ünï"}
    locations = {0x1234: 'f,"quoted"\nname+0x10'}
    write_events(path, odd_values(replay(source).events), source,
                 header={"drop_reasons": reasons}, footer={"locations": locations})  # fmt: skip
    monkeypatch.setattr(export_mod, "BATCH_ROWS", 100)
    assert_same_values(path)
    df = load_events(path)
    assert {'we,ir"d', "ünï\tx"} <= set(df.dev.dropna()) and df.dev.isna().any()
    assert {'NO,SOCKET "x"', "reason-77", "ünï"} <= set(df.drop_reason.dropna())
    assert df.ts.iloc[9] < 0 and df.location.iloc[7] == "0x999"
    assert df.location.iloc[6] == locations[0x1234] and df.point.iloc[3] == "point-99"
