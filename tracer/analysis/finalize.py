"""Finished connections -> (Connection, Diagnosis), many at a time.

A TCP connection whose events prove it healthy is recognised with array operations
over all connections of a round, without building its packets and hops: it
becomes a LazyConnection (packets built from its rows on first access) with
the verdict diagnose() gives it. Every other connection is decoded, reassembled
(reassemble.connection_of) and diagnosed exactly as tracer.analysis.analyse
does.

Healthy means, over the connection's events in time order, with "reply side"
as reassembly defines a packet's direction (the key reversed or the reply
tuple of any conntrack entry its events carried):
  1. the first event is not on the reply side (so the first packet is an
     original one and the client's namespace is that event's),
  2. every SYN+ACK event is on the reply side,
  3. every SYN+ACK event in the client's namespace comes from the service
     address, and there is at least one,
  4. every event in the client's namespace has the key or its reverse as its
     tuple (nothing reached the client untranslated; a client that is its own
     backend is left to the full diagnosis),
  5. no event-loss window overlaps the connection,
  6. none of its events is a drop or an ICMP error.
Then diagnose() finds a SYN+ACK delivered from the service and nothing
untranslated: verdict ok, no break, no notes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from tracer.analysis.batch import (
    EventFields,
    RecordCodec,
    RowsRef,
    TupleIds,
    concat_derived,
    rows_from,
    take_derived,
)
from tracer.analysis.context import Context
from tracer.analysis.diagnose import Diagnosis, diagnose
from tracer.analysis.reassemble import Connection, Packet, connection_of, endpoint_pods
from tracer.events.model import ACK, RST, SYN, Conntrack, Tuple

OK = Diagnosis("ok", None, ())


class LazyConnection(Connection):
    """A healthy connection whose packets are built from its raw rows when first read.

    Until then it refers to the rows of the batch it was read in (keeping that batch
    alive); fields() gives its events as arrays, for writing it without its objects."""

    def __init__(
        self,
        key: Tuple,
        backend: tuple[str, int] | None,
        rows: RowsRef,
        codec: RecordCodec,
        ctx: Context,
        span: tuple[int, int],
        isn: int | None = None,
    ) -> None:
        self.key = key
        self.backend = backend
        self.isn = isn
        self.client_pod, self.backend_pod = endpoint_pods(key, backend, ctx)
        self._rows: RowsRef | None = rows
        self._codec, self._ctx = codec, ctx
        self._span = span
        self._full: Connection | None = None

    def _built(self) -> Connection:
        if self._full is None:
            assert self._rows is not None
            rows = rows_from(self._codec, [self._rows])
            self._full = connection_of(self.key, self._codec.events(rows), self._ctx, self.isn)
            self._rows = None
        return self._full

    @property
    def built(self) -> bool:
        """Whether its packets were built (then fields() is no longer available)."""
        return self._full is not None

    @property
    def context(self) -> Context:
        return self._ctx

    def fields(self) -> EventFields:
        """Its events, in time order, as arrays (before its packets are built)."""
        assert self._rows is not None
        return self._codec.fields(rows_from(self._codec, [self._rows]))

    @property
    def packets(self) -> list[Packet]:
        return self._built().packets

    @packets.setter
    def packets(self, value: list[Packet]) -> None:
        self._built().packets = value

    @property
    def ct_ids(self) -> set[int]:
        return self._built().ct_ids

    @ct_ids.setter
    def ct_ids(self, value: set[int]) -> None:
        self._built().ct_ids = value

    @property
    def last_ct(self) -> Conntrack | None:
        return self._built().last_ct

    @last_ct.setter
    def last_ct(self, value: Conntrack | None) -> None:
        self._built().last_ct = value

    @property
    def first_ns(self) -> int:
        return self._span[0]

    @property
    def last_ns(self) -> int:
        return self._span[1]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Connection):
            return NotImplemented
        mine = (self.key, self.backend, self.packets, self.ct_ids, self.last_ct, self.isn)
        return mine == (
            other.key,
            other.backend,
            other.packets,
            other.ct_ids,
            other.last_ct,
            other.isn,
        )

    __hash__ = None  # type: ignore[assignment]


class Closing(NamedTuple):
    """One connection to finalize: its key, raw rows and DERIVED entries (chunks in
    arrival order), the trace time to judge it at (the Context's end_ns for diagnose),
    the trace time it was known to be over (close_ns) and its client's ISN."""

    key64: int
    key: Tuple
    rows: list[RowsRef]
    derived: list[np.ndarray]
    end_ns: int
    close_ns: int
    isn: int | None


class Finished(NamedTuple):
    """A finalized connection. order: (time it was known to be over, first event's time,
    its arrival index): the order the engine judges connections in, and the report's."""

    order: tuple[int, int, int]
    conn: Connection
    diag: Diagnosis


_M16 = np.uint64(0xFFFF)
_MADDR = np.uint64(TupleIds.ADDR_MASK)


def _src(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (t >> np.uint64(48)) & _MADDR, (t >> np.uint64(16)) & _M16


def _dst(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (t >> np.uint64(32)) & _MADDR, t & _M16


class Finalizer:
    """Turns rounds of Closing connections into Finished ones."""

    def __init__(self, ctx: Context, codec: RecordCodec, tuples: TupleIds) -> None:
        self.ctx, self.codec, self.tuples = ctx, codec, tuples
        self.full = 0  # connections given the full diagnosis
        self.fast = 0  # connections recognised healthy from their columns
        # called per finished connection, when set: (order, its events' arrival indices,
        # which of them are on its reply side) -- what an export's conn column needs
        self.membership: Callable[[tuple[int, int, int], np.ndarray, np.ndarray], None] | None = (
            None
        )

    def run(self, closing: list[Closing]) -> list[Finished]:
        if not closing:
            return []
        lengths = np.array([sum(len(x) for x in c.derived) for c in closing], dtype=np.int64)
        d = concat_derived([x for c in closing for x in c.derived])
        seg = np.repeat(np.arange(len(closing)), lengths)
        order = None
        if not _in_order(seg, d["ts"], d["arrival"]):
            order = np.lexsort((d["arrival"], d["ts"], seg))
            d = take_derived(d, order)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        ends = starts + lengths
        healthy, backend_at = self._healthy(closing, d, seg, starts)
        ts, r64 = d["ts"], d["r"]
        first, last = ts[starts].tolist(), ts[ends - 1].tolist()
        arrival = d["arrival"][starts].tolist()
        has_backend = backend_at >= 0
        b_src = np.where(has_backend, (r64[backend_at] >> np.uint64(48)) & _MADDR, 0).tolist()
        b_port = np.where(has_backend, (r64[backend_at] >> np.uint64(16)) & _M16, 0).tolist()
        has_backend_l, healthy_l = has_backend.tolist(), healthy.tolist()
        starts_l, ends_l = starts.tolist(), ends.tolist()
        name, codec, ctx = self.tuples.name, self.codec, self.ctx
        if self.membership is not None:
            self._members(closing, d, seg, starts_l, ends_l, first, arrival)
        out: list[Finished] = []
        for j, c in enumerate(closing):
            ref = c.rows[0] if len(c.rows) == 1 else (rows_from(codec, c.rows), None)
            if order is not None:  # this connection's rows in (time, arrival) order
                s, e = starts_l[j], ends_l[j]
                ref = (rows_from(codec, [ref]), order[s:e] - s)
            order_key = (c.close_ns, first[j], arrival[j])
            if healthy_l[j]:
                backend = (name(b_src[j]), b_port[j]) if has_backend_l[j] else None
                span = (first[j], last[j])
                conn: Connection = LazyConnection(c.key, backend, ref, codec, ctx, span, c.isn)
                out.append(Finished(order_key, conn, OK))
                self.fast += 1
                continue
            proto = "udp" if TupleIds.is_udp(c.key64) else "tcp"
            events = codec.events(rows_from(codec, [ref]))
            full = connection_of(c.key, events, ctx, c.isn, proto)
            out.append(Finished(order_key, full, diagnose(full, replace(ctx, end_ns=c.end_ns))))
            self.full += 1
        return out

    def _members(
        self,
        closing: list[Closing],
        d: np.ndarray,
        seg: np.ndarray,
        starts: list[int],
        ends: list[int],
        first: list[int],
        arrival: list[int],
    ) -> None:
        """Hand membership() each connection's events and their direction: reply when the
        event's tuple is the key reversed or the reply tuple of one of its conntrack
        entries (reassembly's rule)."""
        assert self.membership is not None
        key64 = np.array([c.key64 for c in closing], dtype=np.uint64)
        t64 = d["t"]
        reply = t64 == self.tuples.reverse(key64)[seg]
        p = np.flatnonzero(d["ct"])
        if len(p):
            reply |= _member(seg[p], d["r"][p], seg, t64)
        arr = d["arrival"]
        for j, c in enumerate(closing):
            s, e = starts[j], ends[j]
            self.membership((c.close_ns, first[j], arrival[j]), arr[s:e], reply[s:e])

    def _healthy(
        self, closing: list[Closing], d: np.ndarray, seg: np.ndarray, starts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per connection: healthy (see the module doc) and the row of its backend's
        conntrack entry (the last one of its key that was DNATed; -1 when none)."""
        k = len(closing)
        t64 = d["t"]
        key64 = np.array([c.key64 for c in closing], dtype=np.uint64)
        krev64 = self.tuples.reverse(key64)
        p = np.flatnonzero(d["ct"])
        o64, r64 = d["o"][p], d["r"][p]
        # backend: the last conntrack entry of the key whose reply source is not the
        # original destination (reassemble's `backend`)
        (rs, rsp), (od, odp) = _src(r64), _dst(o64)
        dnat = p[(o64 == key64[seg[p]]) & ((rs != od) | (rsp != odp))]  # ascending
        last = np.ones(len(dnat), dtype=bool)  # the last of each connection's
        last[:-1] = seg[dnat][1:] != seg[dnat][:-1]
        backend_at = np.full(k, -1, dtype=np.int64)
        backend_at[seg[dnat][last]] = dnat[last]

        f = d["flags"]
        sa = np.flatnonzero(((f & SYN) != 0) & ((f & ACK) != 0) & ((f & RST) == 0))
        q = np.concatenate((starts, sa))
        reply = t64[q] == krev64[seg[q]]
        # the other reply tuples: conntrack replies other than the key reversed (after
        # DNAT), each (connection, tuple) once in a row: a few per connection
        other = r64 != krev64[seg[p]]
        ps, rv = seg[p][other], r64[other]
        keep = np.ones(len(rv), dtype=bool)
        keep[1:] = (ps[1:] != ps[:-1]) | (rv[1:] != rv[:-1])
        ask = ~reply
        reply[ask] = _member(ps[keep], rv[keep], seg[q][ask], t64[q][ask])
        first_original = ~reply[:k]
        sa_reply = reply[k:]
        sa_seg = seg[sa]
        in_client = d["netns"][sa] == d["netns"][starts][sa_seg]
        ctx = self.ctx
        src, sport = _src(t64[sa])
        if ctx.service_prefix >= 32:
            from_svc = self.tuples.in_service(src)
            if ctx.service_port:
                from_svc &= sport == ctx.service_port
        else:  # a range: from the connection's own Service (pods may share the range)
            called, called_port = _dst(key64[sa_seg])
            from_svc = (src == called) & (sport == called_port)
        bad = np.bincount(sa_seg[~sa_reply | (in_client & ~from_svc)], minlength=k)
        good = np.bincount(sa_seg[in_client & from_svc], minlength=k)
        healthy = first_original & (bad == 0) & (good > 0)
        # TCP only: a UDP flow (no handshake) always gets the full diagnosis
        healthy &= (key64 >> np.uint64(63)) == 0
        # a packet of it dropped on the way (after the handshake too: an MTU black hole),
        # or an ICMP error about one of its packets
        healthy &= np.bincount(seg[d["special"]], minlength=k) == 0
        # in the client's namespace every packet is client -> service or back: anything
        # else is a reply that escaped reverse NAT (or the client is its own backend)
        client_ns = d["netns"][starts][seg]
        stray = (d["netns"] == client_ns) & (t64 != key64[seg]) & (t64 != krev64[seg])
        healthy &= np.bincount(seg[stray], minlength=k) == 0
        if ctx.loss_windows:
            first = d["ts"][starts].astype(np.int64)
            last = np.maximum.reduceat(d["ts"], starts).astype(np.int64)
            hi = np.maximum(last, first) + ctx.reply_timeout_ns
            for w_first, w_last in ctx.loss_windows:
                healthy &= ~((w_first <= hi) & (w_last >= first))
        return healthy, backend_at


def _in_order(seg: np.ndarray, ts: np.ndarray, arrival: np.ndarray) -> bool:
    """Rows already sorted by (segment, ts, arrival)? (the usual case: no sort needed)"""
    if len(ts) < 2:
        return True
    same = seg[1:] == seg[:-1]
    dts = ts[1:].astype(np.int64) - ts[:-1].astype(np.int64)
    later = (dts > 0) | ((dts == 0) & (arrival[1:] > arrival[:-1]))
    return bool(np.all(~same | later))


def _member(
    set_seg: np.ndarray, set_val: np.ndarray, q_seg: np.ndarray, q_val: np.ndarray
) -> np.ndarray:
    """For each query (q_seg[i], q_val[i]): is that pair among (set_seg, set_val)?"""
    segs = np.concatenate((set_seg, q_seg))
    vals = np.concatenate((set_val, q_val))
    isq = np.concatenate((np.zeros(len(set_seg), np.int8), np.ones(len(q_seg), np.int8)))
    if not len(q_seg):
        return np.zeros(0, dtype=bool)
    o = np.lexsort((isq, vals, segs))
    ss, vv = segs[o], vals[o]
    new = np.ones(len(o), dtype=bool)
    new[1:] = (ss[1:] != ss[:-1]) | (vv[1:] != vv[:-1])
    run = np.cumsum(new) - 1
    first_is_set = isq[o][new] == 0
    hit = np.empty(len(o), dtype=bool)
    hit[o] = first_is_set[run]
    return hit[len(set_seg) :]
