"""Which connection of the report each event belongs to, without holding the events.

tracer.analysis.reassemble groups all events at once. This builds the same
grouping from one streaming pass over a session, keeping only what is needed
per distinct 4-tuple (the BPF filter limits tuples to those of the Service's
connections, so memory grows with connections, not with events). Index i is
the i-th connection of analyse() / the JSON report; direction is the packet's
("original" or "reply") as reassembly assigns it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tracer.analysis.context import Context
from tracer.analysis.model import Event, Tuple

_Order = tuple[int, int]  # (ts_ns, position in the file): reassembly's stable time order


class ConnIndex:
    """Maps an event's tuple to (connection index, direction)."""

    def __init__(self, by_tuple: dict[Tuple, tuple[int, str]]) -> None:
        self._by_tuple = by_tuple

    def lookup(self, ev: Event) -> tuple[int | None, str | None]:
        return self._by_tuple.get(ev.tuple, (None, None))

    @classmethod
    def build(cls, batches: Iterable[list[Event]], ctx: Context) -> ConnIndex:
        """One pass over every event of the session (in recording order)."""
        first: dict[Tuple, _Order] = {}  # event tuple -> its earliest event
        claims: dict[Tuple, tuple[_Order, Tuple]] = {}  # tuple -> earliest service conntrack
        replies: set[tuple[Tuple, Tuple]] = set()  # (event tuple, its conntrack reply tuple)
        pos = 0
        for batch in batches:
            for ev in batch:
                order = (ev.ts_ns, pos)
                pos += 1
                earliest = first.get(ev.tuple)
                if earliest is None or order < earliest:
                    first[ev.tuple] = order
                ct = ev.ct
                if ct is None:
                    continue
                replies.add((ev.tuple, ct.reply))
                if not ctx.is_service(ct.orig.dst, ct.orig.dport):
                    continue
                for t in (ct.orig, ct.orig.reversed(), ct.reply, ct.reply.reversed()):
                    seen = claims.get(t)
                    if seen is None or order < seen[0]:
                        claims[t] = (order, ct.orig)
        keys = {t: orig for t, (_o, orig) in claims.items()}

        def key_of(t: Tuple) -> Tuple | None:
            if t in keys:
                return keys[t]
            if ctx.is_service(t.dst, t.dport):
                return t
            if ctx.is_service(t.src, t.sport):
                return t.reversed()
            return None

        starts: dict[Tuple, _Order] = {}
        key_by_tuple: dict[Tuple, Tuple] = {}
        for t, order in first.items():
            key = key_of(t)
            if key is not None:
                key_by_tuple[t] = key
                starts[key] = min(order, starts.get(key, order))
        index = {key: i for i, key in enumerate(sorted(starts, key=starts.__getitem__))}
        reply_side = {key: {key.reversed()} for key in index}
        for t, reply in replies:
            if t in key_by_tuple:
                reply_side[key_by_tuple[t]].add(reply)
        return cls(
            {
                t: (index[key], "reply" if t in reply_side[key] else "original")
                for t, key in key_by_tuple.items()
            }
        )
