"""Session files (format hairtrace/session@1): record a live trace, analyse it elsewhere.

format   -- the byte layout (preamble, checksummed chunks)
header   -- SessionHeader / SessionFooter: what the recording was, as JSON chunks
writer   -- SessionWriter: appends batches of raw ring-buffer records, crash-safe
reader   -- open_session / SessionReader: header, footer, events chunk by chunk
replay   -- replay(): what a live trace returns, rebuilt from a file; replay_stream():
            the same analysis of a session of any length, in bounded memory
synth    -- synthesize(): a large session from recorded ones (for measuring replay)
export   -- export_session(): CSV, JSON Lines or Parquet, one row per event
frames   -- load_events / load_connections: pandas DataFrames

pandas and pyarrow are imported only by the functions that need them.
"""

from __future__ import annotations

from tracer.session.columns import COLUMNS, pandas_dtypes
from tracer.session.export import FORMATS, ExportSummary, default_out, export_session
from tracer.session.format import FORMAT_NAME, FORMAT_VERSION
from tracer.session.frames import load_connections, load_events
from tracer.session.header import SessionFooter, SessionHeader
from tracer.session.reader import SessionReader, open_session
from tracer.session.replay import (
    ReplayResult,
    StreamedReplay,
    footer_from_trace,
    header_from_trace,
    replay,
    replay_stream,
)
from tracer.session.writer import SessionWriter, check_target

__all__ = [
    "COLUMNS",
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ExportSummary",
    "ReplayResult",
    "SessionFooter",
    "SessionHeader",
    "SessionReader",
    "SessionWriter",
    "StreamedReplay",
    "check_target",
    "default_out",
    "export_session",
    "footer_from_trace",
    "header_from_trace",
    "load_connections",
    "load_events",
    "open_session",
    "pandas_dtypes",
    "replay",
    "replay_stream",
]
