"""What the summary shows of a trace's connections, gathered one connection at a time.

The summary lists every connection that is not ok and the first ok ones up to a
limit, tallies the rest, and prints each break. A Digest keeps exactly that
(plus counts), so a streamed replay of millions of connections can be summarised
without holding them: add() them in any order with their sort key.
"""

from __future__ import annotations

import heapq
from typing import Any

from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.reassemble import Connection

Result = tuple[Connection, Diagnosis]


class Digest:
    """Counts of every connection added; the rows the summary shows, in order."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.total = 0
        self.verdicts: dict[str, int] = {}
        self.backends: dict[str, int] = {}
        self._bad: list[tuple[Any, Result]] = []  # every connection that is not ok
        self._ok: list[tuple[Any, int, Result]] = []  # max-heap (negated) of the first ok ones
        self._n = 0

    @classmethod
    def of(cls, results: list[Result], max_rows: int) -> Digest:
        """The digest of results already in order."""
        digest = cls(max_rows)
        for i, (conn, diag) in enumerate(results):
            digest.add(i, conn, diag)
        return digest

    def add(self, order: Any, conn: Connection, diag: Diagnosis) -> None:
        """One connection; order sorts the results (e.g. Finished.order)."""
        self.total += 1
        self.verdicts[diag.verdict] = self.verdicts.get(diag.verdict, 0) + 1
        b = f"{conn.backend[0]}:{conn.backend[1]}" if conn.backend else "none"
        self.backends[b] = self.backends.get(b, 0) + 1
        if diag.verdict != "ok":
            self._bad.append((order, (conn, diag)))
            return
        self._n += 1
        item = (_Reversed(order), self._n, (conn, diag))
        if len(self._ok) < self.max_rows:
            heapq.heappush(self._ok, item)
        elif self._ok and order < self._ok[0][0].order:
            heapq.heapreplace(self._ok, item)
        else:
            return
        # The table lists its packet roles: build them now, so that a connection whose
        # packets are built lazily lets go of the batch it was read from.
        _ = conn.packets

    @property
    def results(self) -> list[Result]:
        """Every connection kept (all that are not ok, the first ok ones), in order."""
        kept = self._bad + [(r.order, res) for r, _n, res in self._ok]
        return [res for _order, res in sorted(kept, key=lambda k: k[0])]

    def shown(self) -> tuple[list[Result], int]:
        """The rows worth a line (every non-ok one, then ok ones up to max_rows) in order,
        and how many ok rows are left out."""
        results = self.results
        if self.total <= self.max_rows:
            return results, 0
        room = max(0, self.max_rows - len(self._bad))
        shown, ok_seen = [], 0
        for conn, diag in results:
            if diag.verdict == "ok":
                ok_seen += 1
                if ok_seen > room:
                    continue
            shown.append((conn, diag))
        return shown, self.total - len(shown)

    def tally(self) -> str:
        """'300 connections: 298 ok, 2 broken; backends 100.96.54.247:80 98, ...'"""
        return (
            f"{self.total} connection(s): "
            + ", ".join(f"{n} {v}" for v, n in sorted(self.verdicts.items()))
            + "; backends: "
            + ", ".join(f"{b} {n}" for b, n in sorted(self.backends.items()))
        )


class _Reversed:
    """Orders the ok heap so that its top is the latest kept connection."""

    __slots__ = ("order",)

    def __init__(self, order: Any) -> None:
        self.order = order

    def __lt__(self, other: _Reversed) -> bool:
        return bool(other.order < self.order)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and bool(other.order == self.order)
