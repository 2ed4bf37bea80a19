"""`hairtrace export`: a session as CSV, JSON Lines or Parquet, one row per event.

Columns: tracer.session.columns.COLUMNS. Streaming, in two passes over the
file: the first builds the connection index (memory grows with connections,
not events; see tracer.session.connindex), the second writes rows in
recording order, BATCH_ROWS at a time (a Parquet row group each). Nothing is
written when the session is damaged: a file output appears only complete
(written beside it, renamed at the end).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from tracer.errors import HairtraceError, UsageError
from tracer.session.columns import COLUMNS, NAMES, columnar, rows
from tracer.session.connindex import ConnIndex
from tracer.session.reader import SessionReader, open_session
from tracer.session.replay import context_of

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


def iter_rows(reader: SessionReader) -> Iterator[list[tuple[Any, ...]]]:
    """Rows (COLUMNS order) of every event, BATCH_ROWS at a time.

    The first pass over the file (the connection index) happens before this
    returns, so a damaged file fails before a single row is produced.
    """
    header = reader.header
    ctx = context_of(header, reader.footer, header.start_ns)
    conns = ConnIndex.build(reader.event_batches(), ctx)
    locations = reader.footer.locations if reader.footer is not None else {}

    def batches() -> Iterator[list[tuple[Any, ...]]]:
        pending: list[tuple[Any, ...]] = []
        for batch in reader.event_batches():
            pending.extend(rows(batch, ctx, header.start_ns, conns, locations))
            if len(pending) >= BATCH_ROWS:
                yield pending
                pending = []
        if pending:
            yield pending

    return batches()


class _Sink(Protocol):
    def write(self, batch: list[tuple[Any, ...]]) -> None: ...

    def close(self) -> None: ...


class _Csv:
    def __init__(self, out: IO[bytes]) -> None:
        self.text = io.TextIOWrapper(out, encoding="utf-8", newline="")
        self.csv = csv.writer(self.text)
        self.csv.writerow(NAMES)

    def write(self, batch: list[tuple[Any, ...]]) -> None:
        self.csv.writerows(batch)

    def close(self) -> None:
        self.text.flush()
        self.text.detach()  # leave the caller's stream open


class _Jsonl:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def write(self, batch: list[tuple[Any, ...]]) -> None:
        lines = (json.dumps(dict(zip(NAMES, r, strict=True)), separators=(",", ":")) for r in batch)
        self.out.write("".join(f"{line}\n" for line in lines).encode())

    def close(self) -> None:
        self.out.flush()


class _Parquet:
    def __init__(self, out: IO[bytes]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.schema = arrow_schema()
        self.writer = pq.ParquetWriter(out, self.schema)

    def write(self, batch: list[tuple[Any, ...]]) -> None:
        cols = columnar(batch)
        arrays = [self.pa.array(cols[f.name], type=f.type) for f in self.schema]
        self.writer.write_batch(self.pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def arrow_schema() -> Any:
    """The pyarrow schema of COLUMNS, with pandas metadata so pd.read_parquet restores dtypes."""
    import pandas as pd
    import pyarrow as pa

    def arrow_type(name: str) -> Any:
        return pa.dictionary(pa.int32(), pa.string()) if name == "dict" else getattr(pa, name)()

    empty = pd.DataFrame({c.name: pd.Series([], dtype=c.dtype) for c in COLUMNS})
    meta = pa.Schema.from_pandas(empty, preserve_index=False).metadata
    return pa.schema([(c.name, arrow_type(c.arrow)) for c in COLUMNS]).with_metadata(meta)


def _sink(fmt: str, out: IO[bytes]) -> _Sink:
    if fmt == "csv":
        return _Csv(out)
    if fmt == "jsonl":
        return _Jsonl(out)
    return _Parquet(out)


def _write(reader: SessionReader, fmt: str, out: IO[bytes]) -> int:
    batches = iter_rows(reader)
    try:
        sink = _sink(fmt, out)
    except ImportError as exc:
        raise HairtraceError(f"{fmt} export needs {exc.name} (pip install pyarrow)") from None
    n = 0
    try:
        for batch in batches:
            sink.write(batch)
            n += len(batch)
    finally:
        sink.close()
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
