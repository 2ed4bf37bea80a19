"""The JSON report written as the trace goes: head, each connection when judged, tail.

A live trace (or a replay) knows the report's head fields once it is attached, its
connections one at a time as the engine judges them, and the rest when it ends
(tracer.present.report: head_fields, connections, tail_fields). ReportWriter writes
each part when it is known, so nothing of the report is held in memory and the
report is complete a moment after the trace stops, however long it ran. The text is
exactly what json.dumps(build(run, results), indent=2) writes, then a newline.
Healthy connections are rendered straight from their events' columns
(tracer.present.columnar).

A file is written beside its destination and renamed onto it at the end, so a
report file only ever appears complete; `-` writes to standard output as it goes,
and so does anything that is not a regular file (/dev/null, a pipe).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Any

from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.finalize import LazyConnection
from tracer.analysis.reassemble import Connection
from tracer.errors import HairtraceError
from tracer.present.columnar import ColumnarWriter
from tracer.present.jsontext import dumps_indented
from tracer.present.report import RunInfo, build, connection_dict, head_fields, tail_fields
from tracer.present.services import ServiceTally

_EMPTY = '"connections": []'


def _parts(run: RunInfo, services: ServiceTally | None = None) -> tuple[str, str]:
    """The report's text around its (empty) connections: before `"connections": [`, and
    after its closing bracket (with the tally of the connections per Service)."""
    text = dumps_indented({**build(run, []), **tail_fields(run, services)})
    at = text.index(_EMPTY)
    return text[:at], text[at + len(_EMPTY) :]


class ReportWriter:
    """Writes one report to out (a binary stream): begin(run), add() per connection in
    report order, end(final run)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.connections = 0
        self._columnar = ColumnarWriter()
        self._head: dict[str, Any] | None = None
        self._origin_ns = 0
        self._services = ServiceTally()
        self._names: Any = None

    def begin(self, run: RunInfo) -> None:
        """The head fields (known once attached)."""
        self._head, self._origin_ns = head_fields(run), run.start_ns
        self._names = run.service_names
        before, _after = _parts(run)
        self.out.write((before + '"connections": [').encode())

    def add(self, conn: Connection, diag: Diagnosis) -> None:
        """The next connection of the report (they come in the order the engine judged
        them)."""
        self._services.add(conn, diag)
        if isinstance(conn, LazyConnection) and not conn.built:
            text = self._columnar.entry(conn, diag, self._origin_ns, "\n    ", self._names)
        else:
            text = dumps_indented(connection_dict(conn, diag, self._origin_ns, names=self._names))
            text = text.replace("\n", "\n    ")
        self.out.write((("," if self.connections else "") + "\n    " + text).encode())
        self.connections += 1

    def end(self, run: RunInfo) -> None:
        """The tail fields; run is the final RunInfo (its head fields as at begin)."""
        if head_fields(run) != self._head:
            raise HairtraceError("internal: the report's head changed during the trace")
        _before, after = _parts(run, self._services)
        close = "\n  ]" if self.connections else "]"
        self.out.write((close + after + "\n").encode())
        self.out.flush()


class ReportFile:
    """Where a ReportWriter writes: a file (written beside it, renamed at the end) or
    standard output ('-')."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self._tmp: Path | None = None
        if dest == "-":
            sys.stdout.flush()
            self.stream: IO[bytes] = sys.stdout.buffer
            return
        path = Path(dest)
        special = path.exists() and not path.is_file()  # /dev/null, a pipe: written as is
        if not special:
            self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.stream = open(self._tmp or path, "wb")  # noqa: SIM115 (closed by done/abandon)
        except OSError as exc:
            raise HairtraceError(f"cannot write {dest}: {exc.strerror}") from exc

    def done(self) -> None:
        """The report is complete: it takes its place."""
        try:
            self.stream.flush()
            if self.dest != "-":
                self.stream.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.dest)
                self._tmp = None
        except OSError as exc:
            raise HairtraceError(f"cannot write {self.dest}: {exc.strerror}") from exc

    def abandon(self) -> None:
        """No report: the partial file goes (standard output keeps what it got)."""
        if self.dest != "-":
            self.stream.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
