"""`hairtrace export`: a session as CSV, JSON Lines or Parquet, one row per event.

Columns: tracer.session.columns.COLUMNS. Two passes over the file:
  1. the analysis engine (tracer.session.replay.replay_stream) runs over the session
     and says, per connection it judged, which events are its own and on which side
     (its membership): the `conn` and `direction` of every event, kept as two arrays
     indexed by the event's position in the file (9 bytes per event). This is the
     connection identity of the JSON report (docs/connections.md): a reused 4-tuple
     with a new ISN is a new connection;
  2. the records are read again as numpy rows, BATCH_ROWS at a time, and each batch
     becomes Arrow columns at once (tracer.session.columns.event_columns): a Parquet row
     group each, or CSV / JSON Lines text built column by column.
Nothing is written when the session is damaged (the first pass fails first): a file
output appears only complete (written beside it, renamed at the end).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json  # json.dumps' (ensure_ascii)
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from tracer.analysis.finalize import Finished
from tracer.errors import HairtraceError, UsageError
from tracer.events.rows import rows_of
from tracer.session.columns import NAMES, NO_CONN, Naming, arrow_schema, event_columns, record_batch
from tracer.session.reader import SessionReader, open_session
from tracer.session.replay import StreamedReplay, replay_stream

FORMATS = ("csv", "jsonl", "parquet")
BATCH_ROWS = 65536


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: rows, where (None: the given stream), the reader's warnings."""

    rows: int
    out: Path | None
    warnings: tuple[str, ...]


def default_out(path: str | Path, fmt: str) -> Path:
    """Where `hairtrace export FILE --format FMT` writes without --out: FILE with that suffix."""
    return Path(path).with_suffix("." + fmt)


# ------------------------------------------------------------------ pass 1


@dataclass(frozen=True)
class Membership:
    """Per event (its position in the file): the index of its connection in the report
    and its DIRECTIONS code there, NO_CONN for the events of no connection."""

    conn: np.ndarray  # int64
    direction: np.ndarray  # int8
    replay: StreamedReplay


class _Members:
    """The engine's membership calls gathered into Membership's arrays.

    The engine reports a connection's events (membership) before or in the same
    flush as the connection itself (sink), and sinks connections in report order: so
    the i-th sink call names connection i, and only one flush of members waits."""

    def __init__(self, events: int) -> None:
        self.conn = np.full(events, NO_CONN, dtype=np.int64)
        self.direction = np.full(events, NO_CONN, dtype=np.int8)
        self.waiting: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.judged = 0

    def members(self, order: tuple[int, int, int], arrivals: np.ndarray, reply: np.ndarray) -> None:
        self.waiting[order] = (arrivals, reply)

    def sink(self, f: Finished) -> None:
        arrivals, reply = self.waiting.pop(f.order)
        if len(arrivals) and int(arrivals.max()) >= len(self.conn):
            self._grow(int(arrivals.max()) + 1)
        self.conn[arrivals] = self.judged
        self.direction[arrivals] = reply
        self.judged += 1

    def _grow(self, events: int) -> None:
        """Room for more events than the file had when it was opened (still recorded)."""
        more = max(events, 2 * len(self.conn)) - len(self.conn)
        self.conn = np.concatenate((self.conn, np.full(more, NO_CONN, dtype=np.int64)))
        self.direction = np.concatenate((self.direction, np.full(more, NO_CONN, dtype=np.int8)))


def membership(reader: SessionReader) -> Membership:
    """Run the engine over the session and keep which connection each event is of."""
    gathered = _Members(reader.size // reader.header.record_size)  # no more records fit
    streamed = replay_stream(reader.path, gathered.sink, membership=gathered.members)
    n = streamed.run.events
    return Membership(gathered.conn[:n], gathered.direction[:n], streamed)


# ------------------------------------------------------------------ pass 2


def event_batches(reader: SessionReader) -> Iterator[list[Any]]:
    """Every event as batches of BATCH_ROWS rows (the last one shorter), in recording
    order: each the columns of columns.event_columns (record_batch() makes a pyarrow
    RecordBatch of one).

    The connection pass happens before this returns, so a damaged file fails before
    a single row is produced."""
    member = membership(reader)
    header, footer = reader.header, reader.footer
    locations = footer.locations if footer is not None else {}
    names = Naming(member.replay.context, header.start_ns, locations)

    def batches() -> Iterator[list[Any]]:
        start = 0
        for rows in _row_batches(reader.payloads(), header.record_size, BATCH_ROWS):
            end = start + len(rows)
            if end > len(member.conn):  # the file now holds events the first pass did not
                raise HairtraceError(f"session file {reader.path} changed during the export")
            conn, direction = member.conn[start:end], member.direction[start:end]
            yield event_columns(rows, conn, direction, names)
            start = end

    return batches()


def _row_batches(payloads: Iterable[bytes], record_size: int, size: int) -> Iterator[np.ndarray]:
    """The records of the chunks as numpy rows, `size` at a time: views of a chunk, except
    a batch that spans chunks (copied)."""
    rest: np.ndarray | None = None  # the start of a batch, from the chunks before
    for payload in payloads:
        rows = rows_of(payload, record_size)
        if rest is not None:
            need = size - len(rest)
            if len(rows) < need:
                rest = np.concatenate((rest, rows))
                continue
            yield np.concatenate((rest, rows[:need]))
            rows, rest = rows[need:], None
        whole = len(rows) - len(rows) % size
        for i in range(0, whole, size):
            yield rows[i : i + size]
        if whole < len(rows):
            rest = rows[whole:]
    if rest is not None:
        yield rest


# ------------------------------------------------------------------ writers


class _Sink(Protocol):
    def write(self, columns: list[Any]) -> None: ...

    def close(self) -> None: ...


# CSV and JSON Lines hold the text the csv and json modules wrote row by row (repr() of
# floats, str() of ints, csv.QUOTE_MINIMAL quoting, ASCII-escaped JSON strings, nothing
# or null for null). Each column's text is built at once: numbers cast by pyarrow, the
# labels of a dictionary column (every text column: see columns.event_columns) quoted
# once each; then the fields of every row are joined in one pyarrow call. Only the
# floats go through Python value by value (repr() is the format to keep).


def _csv_field(s: str) -> str:
    """A string as csv.writer writes it (QUOTE_MINIMAL, quotes doubled)."""
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\r\n') else s


def _text(column: Any, quote: Callable[[str], str]) -> Any:
    """A column as a pyarrow string array of its values' text, strings written by quote
    (null stays null)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.DictionaryArray):
        labels = [quote(s) for s in column.dictionary.to_pylist()]
        return pa.array(labels, type=pa.string()).take(column.indices)
    if pa.types.is_string(column.type):
        return pa.array([None if s is None else quote(s) for s in column.to_pylist()],
                        type=pa.string())  # fmt: skip
    if pa.types.is_floating(column.type):
        return pa.array([None if v is None else repr(v) for v in column.to_pylist()],
                        type=pa.string())  # fmt: skip
    return pc.cast(column, pa.string())


def _write_joined(out: IO[bytes], lines: Any) -> None:
    """The texts of a string array back to back (its value buffer, not copied)."""
    if len(lines):
        offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
        start, end = int(offsets[lines.offset]), int(offsets[lines.offset + len(lines)])
        out.write(memoryview(lines.buffers()[2])[start:end])


class _Csv:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        out.write((",".join(NAMES) + "\r\n").encode())  # csv.writer's header and line end

    def write(self, columns: list[Any]) -> None:
        import pyarrow.compute as pc

        texts = [_text(c, _csv_field) for c in columns]
        texts[-1] = pc.binary_join_element_wise(  # the line end after the last field
            texts[-1], "", "\r\n", null_handling="replace", null_replacement=""
        )
        lines = pc.binary_join_element_wise(
            *texts, ",", null_handling="replace", null_replacement=""
        )
        _write_joined(self.out, lines)

    def close(self) -> None:
        self.out.flush()


class _Jsonl:
    """One object per line, keys in COLUMNS order, as json.dumps(row, separators=(",",
    ":")) wrote it: each field is its key spliced before its value's text (a null's
    text is null), the braces spliced around the first and the last."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.keys = [_json(name) + ":" for name in NAMES]
        self.keys[0] = "{" + self.keys[0]

    def write(self, columns: list[Any]) -> None:
        import pyarrow.compute as pc

        fields = [
            pc.coalesce(pc.binary_replace_slice(_text(c, _json), 0, 0, key), key + "null")
            for key, c in zip(self.keys, columns, strict=True)
        ]
        fields[-1] = pc.binary_replace_slice(fields[-1], _END, _END, "}\n")
        _write_joined(self.out, pc.binary_join_element_wise(*fields, ","))

    def close(self) -> None:
        self.out.flush()


_END = 1 << 30  # a slice start past the end of any field: binary_replace_slice appends


class _Parquet:
    """Row groups of BATCH_ROWS. Dictionary pages for the columns that repeat (the
    categories and the conntrack strings, not skb ids or numbers), min/max statistics
    for the numeric columns only (the ones a reader filters on by range): statistics
    of the text columns cost as much as writing them."""

    def __init__(self, out: IO[bytes]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = arrow_schema()
        repeat = [f.name for f in schema if pa.types.is_dictionary(f.type)]
        numeric = [f.name for f in schema if pa.types.is_integer(f.type) or
                   pa.types.is_floating(f.type)]  # fmt: skip
        self.writer = pq.ParquetWriter(
            out,
            schema,
            use_dictionary=[*repeat, "ct_id", "ct_original", "ct_reply"],
            write_statistics=numeric,
        )

    def write(self, columns: list[Any]) -> None:
        self.writer.write_batch(record_batch(columns))

    def close(self) -> None:
        self.writer.close()


def _sink(fmt: str, out: IO[bytes]) -> _Sink:
    if fmt == "csv":
        return _Csv(out)
    if fmt == "jsonl":
        return _Jsonl(out)
    return _Parquet(out)


def _write(reader: SessionReader, fmt: str, out: IO[bytes]) -> int:
    batches = event_batches(reader)
    try:
        sink = _sink(fmt, out)
    except ImportError as exc:
        raise HairtraceError(f"{fmt} export needs {exc.name} (pip install pyarrow)") from None
    try:
        return _write_behind(sink, batches)
    finally:
        sink.close()


def _write_behind(sink: _Sink, batches: Iterable[list[Any]]) -> int:
    """Write each batch in a worker thread while the next one is built (pyarrow encodes,
    compresses and joins text without the GIL): two batches in memory at most."""
    n = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hairtrace-export") as pool:
        writing: Future[None] | None = None
        for batch in batches:
            if writing is not None:
                writing.result()  # the writer's error, if any, stops the export here
            writing = pool.submit(sink.write, batch)
            n += len(batch[0])
        if writing is not None:
            writing.result()
    return n


def export_session(
    path: str | Path,
    fmt: str,
    out: str | Path | IO[bytes] | None = None,
    *,
    overwrite: bool = False,
) -> ExportSummary:
    """Write the events of session `path` as fmt to out (a path, a binary stream, or None:
    default_out(path, fmt)). An existing out file is kept unless overwrite."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (use csv, jsonl or parquet)")
    reader = open_session(path)
    warnings = tuple(reader.warnings)
    if out is not None and not isinstance(out, str | Path):
        return ExportSummary(_write(reader, fmt, out), None, warnings)
    dest = Path(out) if out is not None else default_out(path, fmt)
    if dest.exists() and dest.resolve() == Path(path).resolve():
        raise UsageError(f"export output {dest} is the session file itself")
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} exists (use --force to overwrite)")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            n = _write(reader, fmt, f)
        os.replace(tmp, dest)
    except OSError as exc:
        raise HairtraceError(f"writing {dest}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportSummary(n, dest, warnings)
