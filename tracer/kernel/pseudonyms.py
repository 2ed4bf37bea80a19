"""Per-trace ids in place of the kernel addresses that raw records carry.

struct ht_event (bpf/hairtrace.h) holds three kernel pointers: `skb` (the
packet's sk_buff), `ct_id` (its struct nf_conn) and `location` (the text
address of the function that freed a dropped skb). The analysis needs only
their identity, and sessions, exports and reports are handed around: raw
pointers would give away the kernel's memory layout (KASLR). Pseudonyms
replaces each distinct nonzero value by 1, 2, 3, ... in order of first
appearance, separately per field; 0 (none) stays 0. Applied once where live
batches enter user space (tracer.trace) and when reading older session files
(tracer.session.reader); applied again to its own output it changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat

import numpy as np

from tracer.errors import HairtraceError
from tracer.events.codec import EVENT_SIZE, LAYOUT

FIELDS = ("skb", "ct_id", "location")
# The three are adjacent u64 fields of struct ht_event: one block of 24 bytes per record.
_START, _END = LAYOUT[FIELDS[0]][0], LAYOUT[FIELDS[-1]][0] + 8
assert _END - _START == 8 * len(FIELDS)
assert all(LAYOUT[name] == (_START + 8 * i, 8) for i, name in enumerate(FIELDS))


class _Table:
    """value -> id of one field: the older entries as sorted numpy arrays (looked up
    vectorised), the recent ones in a dict, merged into the arrays once it holds a
    quarter as many (so each value is re-sorted O(log n) times in all)."""

    MERGE_AT = 4096

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.uint64)
        self.ids = np.empty(0, dtype=np.uint64)
        self.recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys) + len(self.recent)

    def lookup(self, uniq: np.ndarray) -> np.ndarray:
        """The id of each (sorted, distinct) value; 0 where not seen yet."""
        out = np.zeros(len(uniq), dtype=np.uint64)
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, uniq), len(self.keys) - 1)
            hit = self.keys[pos] == uniq
            out[hit] = self.ids[pos[hit]]
        if self.recent:
            miss = np.flatnonzero(out == 0)
            got = list(map(self.recent.get, uniq[miss].tolist(), repeat(0)))
            out[miss] = np.array(got, dtype=np.uint64)
        return out

    def add(self, values: np.ndarray, ids: np.ndarray) -> None:
        self.recent.update(zip(values.tolist(), ids.tolist(), strict=True))
        if len(self.recent) >= max(self.MERGE_AT, len(self.keys) // 4):
            n = len(self.recent)
            keys = np.concatenate([self.keys, np.fromiter(self.recent, np.uint64, n)])
            ids = np.concatenate([self.ids, np.fromiter(self.recent.values(), np.uint64, n)])
            order = np.argsort(keys)
            self.keys, self.ids, self.recent = keys[order], ids[order], {}

    def items(self) -> list[tuple[int, int]]:
        return [*zip(self.keys.tolist(), self.ids.tolist(), strict=True), *self.recent.items()]


class Pseudonyms:
    """The value -> id tables of one trace; rewrite() applies them to each batch."""

    def __init__(self) -> None:
        self._tables = {name: _Table() for name in FIELDS}

    def rewrite(self, batch: np.ndarray) -> None:
        """Replace, in place, the address fields of a (n, record_size) uint8 array."""
        if batch.ndim != 2 or batch.shape[1] < EVENT_SIZE or batch.dtype != np.uint8:
            raise HairtraceError(f"pseudonyms: not a batch of records: {batch.shape} {batch.dtype}")
        if not len(batch):
            return
        # Strided access to a 128-byte record costs as much as the work itself: the three
        # fields are copied out as contiguous columns and written back once.
        view = batch[:, _START:_END].view("<u8")
        cols = np.ascontiguousarray(view.T)
        for name, col in zip(FIELDS, cols, strict=True):
            self._rewrite_column(col, self._tables[name])
        view[:] = cols.T

    @staticmethod
    def _rewrite_column(col: np.ndarray, table: _Table) -> None:
        nonzero = np.flatnonzero(col)
        if not len(nonzero):
            return
        dense = len(nonzero) == len(col)  # skb: always set
        values = col if dense else col[nonzero]
        # One sort per batch (np.unique's stable sort is 3x slower): the distinct values,
        # each record's index among them, and where each first appears.
        perm = np.argsort(values)
        ordered = values[perm]
        is_start = np.empty(len(ordered), dtype=bool)
        is_start[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=is_start[1:])
        starts = np.flatnonzero(is_start)
        inverse = np.empty(len(values), dtype=np.intp)
        inverse[perm] = np.cumsum(is_start) - 1
        uniq = ordered[starts]
        mapped = table.lookup(uniq)
        new = np.flatnonzero(mapped == 0)
        if len(new):
            first = np.minimum.reduceat(perm, starts)
            new = new[np.argsort(first[new])]  # new ids in order of first appearance
            fresh = np.arange(len(table) + 1, len(table) + 1 + len(new), dtype=np.uint64)
            mapped[new] = fresh
            table.add(uniq[new], fresh)
        if dense:
            col[:] = mapped[inverse]
        else:
            col[nonzero] = mapped[inverse]

    def count(self, name: str) -> int:
        """Distinct nonzero values of a field seen so far."""
        return len(self._tables[name])

    def location_names(self, function_at: Callable[[int], str | None]) -> dict[int, str]:
        """id -> 'function+0xoff' for every drop location seen that function_at can name.

        Called once, when the trace ends, with the addresses still at hand (they never
        leave this object): function names are no secret, their addresses are.
        """
        out = {}
        for addr, lid in self._tables["location"].items():
            name = function_at(addr)
            if name is not None:
                out[lid] = name
        return dict(sorted(out.items()))


def pseudonymised(payload: bytes, record_size: int, names: Pseudonyms) -> bytes:
    """A copy of records back to back (one session chunk) with names applied."""
    batch = np.frombuffer(payload, dtype=np.uint8).reshape(-1, record_size).copy()
    names.rewrite(batch)
    return batch.tobytes()
