"""The JSON report of a streamed replay, gathered one connection at a time.

The report (tracer.present.report) lists connections in order of their first
packet, behind the run's fields, which a streamed replay knows only at the end;
its connections come as they finish. ReportSpool renders each one when it comes
(healthy ones straight from their events' columns: tracer.present.columnar),
parks the text in a temporary file and writes the whole report at the end:
exactly what json.dumps(build(run, results), indent=2) would have written.
"""

from __future__ import annotations

import tempfile
from typing import IO, Any

from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.finalize import LazyConnection
from tracer.analysis.reassemble import Connection
from tracer.present.columnar import ColumnarWriter
from tracer.present.jsontext import dumps_indented
from tracer.present.report import RunInfo, build, connection_dict


class ReportSpool:
    """The report of a streamed analysis, gathered one connection at a time.

    Each connection is rendered when it is added (exactly as json.dumps(build(...),
    indent=2) renders it inside the report) and parked in a temporary file; write()
    puts them behind the run's fields in the report's order. Memory: a few numbers
    per connection.
    """

    _TAIL = '"connections": []\n}'

    def __init__(self, origin_ns: int) -> None:
        self.origin_ns = origin_ns  # RunInfo.start_ns: packet times are relative to it
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (open until close())
        self._index: list[tuple[Any, int, int]] = []  # (order, offset, length)
        self._end = 0
        self._columnar = ColumnarWriter()

    def add(self, order: Any, conn: Connection, diag: Diagnosis) -> None:
        """One connection; order sorts the report's connections (e.g. Finished.order)."""
        if isinstance(conn, LazyConnection) and not conn.built:
            text = self._columnar.entry(conn, diag, self.origin_ns, "\n    ")
        else:
            text = dumps_indented(connection_dict(conn, diag, self.origin_ns))
            text = text.replace("\n", "\n    ")
        raw = ("    " + text).encode()
        self._file.write(raw)
        self._index.append((order, self._end, len(raw)))
        self._end += len(raw)

    def write(self, run: RunInfo, out: IO[bytes]) -> None:
        """The whole report (then a newline), as write_json writes build(run, results)."""
        head = dumps_indented(build(run, []))
        assert head.endswith(self._TAIL)  # build() puts the connections last
        if not self._index:
            out.write((head + "\n").encode())
            return
        out.write((head[: -len(self._TAIL)] + '"connections": [\n').encode())
        self._file.flush()
        for i, (_order, at, length) in enumerate(sorted(self._index, key=lambda e: e[0])):
            self._file.seek(at)
            if i:
                out.write(b",\n")
            out.write(self._file.read(length))
        out.write(b"\n  ]\n}\n")

    def close(self) -> None:
        self._file.close()
