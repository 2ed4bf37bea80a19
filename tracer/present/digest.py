"""What the summary shows of a trace's connections, gathered one connection at a time.

The summary lists the first connections that are not ok and the first ok ones up to
limits, tallies every connection by verdict, cause and backend, and prints each
distinct break once with how many connections broke that way. A Digest keeps exactly
that (plus counts), so a live trace or a replay of millions of connections is
summarised in bounded memory: add() them in any order with their sort key.
"""

from __future__ import annotations

import heapq
from typing import Any

from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.reassemble import Connection
from tracer.present.services import ServiceTally

Result = tuple[Connection, Diagnosis]
Kind = tuple[str, str, str]  # (verdict, cause, where) of a break


class Digest:
    """Counts of every connection added; the rows, breaks and notes the summary shows."""

    def __init__(self, max_rows: int, max_bad_rows: int = 200, max_notes: int = 50) -> None:
        self.max_rows = max_rows  # ok rows listed
        self.max_bad_rows = max_bad_rows  # rows that are not ok listed
        self.max_notes = max_notes
        self.total = 0
        self.verdicts: dict[str, int] = {}
        self.backends: dict[str, int] = {}
        self.causes: dict[str, int] = {}
        self.services = ServiceTally()  # verdicts and causes per Service
        self.notes_total = 0
        self._bad: list[tuple[Any, int, Result]] = []  # max-heaps (negated): the first ones
        self._ok: list[tuple[Any, int, Result]] = []
        self._breaks: dict[Kind, tuple[Any, Result, int]] = {}  # first of each kind, count
        self._notes: list[tuple[Any, int, Result]] = []  # first connections with notes
        self._n = 0

    @classmethod
    def of(cls, results: list[Result], max_rows: int, **limits: int) -> Digest:
        """The digest of results already in order."""
        digest = cls(max_rows, **limits)
        for i, (conn, diag) in enumerate(results):
            digest.add(i, conn, diag)
        return digest

    def add(self, order: Any, conn: Connection, diag: Diagnosis) -> None:
        """One connection; order sorts the results (e.g. Finished.order)."""
        self.total += 1
        self._n += 1
        self.services.add(conn, diag)
        self.verdicts[diag.verdict] = self.verdicts.get(diag.verdict, 0) + 1
        b = f"{conn.backend[0]}:{conn.backend[1]}" if conn.backend else "none"
        if conn.backend and conn.backend_pod:
            b += f" ({conn.backend_pod})"
        self.backends[b] = self.backends.get(b, 0) + 1
        result = (conn, diag)
        if diag.brk is not None:
            cause = diag.brk.cause
            self.causes[cause] = self.causes.get(cause, 0) + 1
            kind = (diag.verdict, cause, diag.brk.where)
            seen = self._breaks.get(kind)
            if seen is None or order < seen[0]:
                self._breaks[kind] = (order, result, (seen[2] if seen else 0) + 1)
            else:
                self._breaks[kind] = (seen[0], seen[1], seen[2] + 1)
        if diag.notes:
            self.notes_total += len(diag.notes)
            _keep_first(self._notes, self.max_notes, order, self._n, result)
        heap, limit = (self._ok, self.max_rows) if diag.verdict == "ok" else (
            self._bad, self.max_bad_rows
        )  # fmt: skip
        if _keep_first(heap, limit, order, self._n, result):
            # The table lists its packet roles: build them now, so that a connection whose
            # packets are built lazily lets go of the batch it was read from.
            _ = conn.packets

    @property
    def broken(self) -> int:
        return self.verdicts.get("broken", 0)

    @property
    def results(self) -> list[Result]:
        """Every connection kept for a row (the first ones not ok, the first ok ones)."""
        return _ordered(self._bad + self._ok)

    def shown(self) -> tuple[list[Result], int]:
        """The rows worth a line (the first non-ok ones, then ok ones up to max_rows) in
        order, and how many connections are left out."""
        bad = _ordered(self._bad)
        room = max(0, self.max_rows - len(bad))
        ok = _ordered(self._ok)[:room]
        keep = {id(r[0]) for r in bad + ok}
        shown = [r for r in self.results if id(r[0]) in keep]
        return shown, self.total - len(shown)

    @property
    def hidden_not_ok(self) -> int:
        """Connections that are not ok but got no row (past max_bad_rows)."""
        return self.total - self.verdicts.get("ok", 0) - len(self._bad)

    def breaks(self) -> list[tuple[Result, int]]:
        """The first connection of each kind of break, in order, with how many broke so."""
        firsts = sorted(self._breaks.values(), key=lambda v: v[0])
        return [(result, n) for _order, result, n in firsts]

    def notes(self) -> tuple[list[Result], int]:
        """The first connections with notes, in order, and how many notes are left out."""
        kept = _ordered(self._notes)
        return kept, self.notes_total - sum(len(d.notes) for _c, d in kept)

    def tally(self) -> str:
        """'300 connection(s): 298 ok, 2 broken; causes: ...; backends: 100.96.54.247:80 98'"""
        causes = ""
        if self.causes:
            causes = "; causes: " + ", ".join(
                f"{c} {n}" for c, n in sorted(self.causes.items(), key=lambda kv: (-kv[1], kv[0]))
            )
        return (
            f"{self.total} connection(s): "
            + ", ".join(f"{n} {v}" for v, n in sorted(self.verdicts.items()))
            + causes
            + "; backends: "
            + ", ".join(f"{b} {n}" for b, n in sorted(self.backends.items()))
        )


def _keep_first(
    heap: list[tuple[Any, int, Result]], limit: int, order: Any, n: int, result: Result
) -> bool:
    """Keep result among the `limit` first by order (heap: a max-heap by order); whether
    it was kept."""
    item = (_Reversed(order), n, result)
    if len(heap) < limit:
        heapq.heappush(heap, item)
        return True
    if heap and order < heap[0][0].order:
        heapq.heapreplace(heap, item)
        return True
    return False


def _ordered(items: list[tuple[Any, int, Result]]) -> list[Result]:
    return [res for _r, _n, res in sorted(items, key=lambda k: (k[0].order, k[1]))]


class _Reversed:
    """Orders a max-heap so that its top is the latest kept connection."""

    __slots__ = ("order",)

    def __init__(self, order: Any) -> None:
        self.order = order

    def __lt__(self, other: _Reversed) -> bool:
        return bool(other.order < self.order)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and bool(other.order == self.order)
