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

from tracer.session.columns import columnar, pandas_dtypes
from tracer.session.export import iter_rows
from tracer.session.reader import open_session
from tracer.session.replay import replay

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
}


def load_events(path: str | Path) -> pd.DataFrame:
    """Every event of a session as a DataFrame (in memory; reads the file twice)."""
    import pandas as pd

    reader = open_session(path)
    all_rows: list[tuple[Any, ...]] = []
    for batch in iter_rows(reader):
        all_rows.extend(batch)
    df = pd.DataFrame(columnar(all_rows)).astype(pandas_dtypes())
    df.attrs["warnings"] = list(reader.warnings)
    return df


def load_connections(path: str | Path) -> pd.DataFrame:
    """One row per connection the analysis found, with verdict and break (a full replay)."""
    import pandas as pd

    res = replay(path)
    origin = res.run.start_ns
    out: list[dict[str, Any]] = []
    for i, (conn, diag) in enumerate(res.results):
        b = diag.brk
        out.append(
            {
                "conn": i,
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
            }
        )
    df = pd.DataFrame(out, columns=list(CONNECTION_DTYPES)).astype(CONNECTION_DTYPES)
    df.attrs["warnings"] = list(res.warnings)
    return df
