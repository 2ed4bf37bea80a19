"""Sessions as pandas DataFrames, for notebooks and scripts (pandas imported on first use).

load_events: one row per event, the columns of tracer.session.columns.COLUMNS
(categoricals for names, unsigned ints for kernel fields, Int64 for the
nullable connection index, float64 seconds `ts`), in recording order.
load_connections: one row per connection of the JSON report, with its verdict.
Both put the reader's warnings (a cut-off file, ...) in df.attrs["warnings"].
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracer.analysis.finalize import Finished
from tracer.session.columns import arrow_schema, pandas_dtypes, record_batch
from tracer.session.export import event_batches
from tracer.session.reader import open_session
from tracer.session.replay import replay_stream

if TYPE_CHECKING:
    import pandas as pd

CONNECTION_DTYPES: dict[str, str] = {
    "conn": "int64",  # index in the JSON report's "connections"
    "client": "str",  # ip:port
    "service": "str",
    "backend": "str",  # where DNAT sent it, null when not seen
    "verdict": "category",  # ok | broken | recovered | incomplete
    "cause": "category",  # the break's cause code, null unless broken
    "break_role": "category",  # the packet that broke (SYN+ACK, ...)
    "break_netns": "category",
    "break_dev": "category",
    "break_point": "category",
    "packets": "int64",
    "events": "int64",
    "first_ts": "float64",  # seconds since the trace started
    "last_ts": "float64",
    "notes": "str",  # "; "-joined, null when none
    "isn": "Int64",  # the client's SYN sequence number, null when no SYN was seen
    "first_seen_mid_connection": "bool",
    "proto": "category",  # tcp | udp
}


def load_events(path: str | Path) -> pd.DataFrame:
    """Every event of a session as a DataFrame (in memory; reads the file twice: the
    connection pass, then the columns, the same batches as `hairtrace export`)."""
    import pyarrow as pa

    reader = open_session(path)
    batches = [record_batch(columns) for columns in event_batches(reader)]
    table = pa.Table.from_batches(batches, schema=arrow_schema())
    df = table.to_pandas().astype(pandas_dtypes())
    df.attrs["warnings"] = list(reader.warnings)
    return df


def load_connections(path: str | Path) -> pd.DataFrame:
    """One row per connection of the JSON report (its order), with verdict and break: the
    session replayed through the engine, each connection turned into its row and
    forgotten (memory: the rows)."""
    import pandas as pd

    origin = open_session(path).header.start_ns
    out: list[dict[str, Any]] = []

    def row(done: Finished) -> None:
        conn, diag = done.conn, done.diag
        b = diag.brk
        out.append(
            {
                "conn": len(out),
                "client": f"{conn.key.src}:{conn.key.sport}",
                "service": f"{conn.key.dst}:{conn.key.dport}",
                "backend": f"{conn.backend[0]}:{conn.backend[1]}" if conn.backend else None,
                "verdict": diag.verdict,
                "cause": b.cause if b else None,
                "break_role": b.packet_role if b else None,
                "break_netns": b.netns if b else None,
                "break_dev": b.dev if b else None,
                "break_point": b.point if b else None,
                "packets": len(conn.packets),
                "events": sum(len(p.hops) for p in conn.packets),
                "first_ts": (conn.first_ns - origin) / 1e9,
                "last_ts": (conn.last_ns - origin) / 1e9,
                "notes": "; ".join(diag.notes) or None,
                "isn": conn.isn,
                "first_seen_mid_connection": conn.first_seen_mid_connection,
                "proto": conn.proto,
            }
        )

    res = replay_stream(path, row)
    df = pd.DataFrame(out, columns=list(CONNECTION_DTYPES)).astype(CONNECTION_DTYPES)
    df.attrs["warnings"] = list(res.warnings)
    return df
