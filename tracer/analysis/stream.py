"""The analysis engine: batches of events in, each connection's diagnosis out once it is done.

There is one engine. The live trace feeds it every drained batch, replay every
session chunk, and tracer.analysis.analyse() a list of events (one batch).
StreamAnalyser reads rows of raw records through a RecordCodec, keeps only the
connections still open, and hands back (Connection, Diagnosis) for each one as
soon as it is over, then forgets its events. Memory is bounded by the open
connections, the tuple -> connection map of recent connections, the events
waiting for their connection to be known and the newest reorder_ns of events.

A connection is one handshake (docs/connections.md has the rules for users):
  - an event belongs to the connection whose service conntrack entry (original
    or reply tuple, either direction) holds its tuple, else to the tuple itself
    when it is addressed to or from the service; anything else is dropped. A
    tuple's entry may show up after some of its events (the tuple after DNAT is
    known once an event carrying the entry arrives), so events without a
    connection wait up to idle_ns for one (`pending`);
  - a client SYN with a sequence number other than the open connection's ISN
    ends that connection (judged as if the trace had gone on for a reply
    timeout after its last event) and opens the next; the same ISN is a
    retransmission and stays; events before any SYN form a connection of
    their own (isn None: first seen mid-connection);
  - events are grouped in time order: the newest reorder_ns (REORDER_NS) of
    events wait for stragglers of other CPUs or chunks before they are grouped.

A connection is over when no event of it arrived for
  - quiet_ns of trace time (event timestamps) after it closed: FIN in both
    directions, or a reset the client's socket sent or got (towards the client, or
    from a client that had completed the handshake); late retransmissions still
    group;
  - idle_ns otherwise (default: the Context's reply timeout plus IDLE_MARGIN_NS,
    which spans TCP's SYN retransmissions up to the fifth, 31 s after the first);
or at a new ISN, or at finish() (judged with the Context's end_ns). It is judged
with diagnose() at end_ns = that moment. Connections come out in the order they
were judged (Finished.order: the time each was known to be over, then its first
event): whatever the batches, the same events give the same list.

Silences are checked per key at the start of each group of its events, so a
silence longer than the limit inside one group does not split a connection.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count

import numpy as np

from tracer.analysis.batch import (
    RecordCodec,
    RowsRef,
    TupleIds,
    concat_derived,
    derive,
    rows_from,
    take_derived,
)
from tracer.analysis.context import Context
from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.finalize import Closing, Finalizer, Finished
from tracer.analysis.reassemble import Connection
from tracer.events.model import ACK, FIN, RST, SYN

QUIET_NS = 2_000_000_000
IDLE_MARGIN_NS = 30_000_000_000
REORDER_NS = 100_000_000
_NEVER = int(np.iinfo(np.uint64).max)
_ORIGINAL, _REPLY = 0, 1
_RST_ORIG, _RST_REPLY, _CLIENT_ACK = 1, 2, 4  # _group_stats bits


class _Open:
    """A connection still open: its events so far and what says whether it is over."""

    __slots__ = (
        "bits",
        "closed",
        "deadline",
        "derived",
        "events",
        "fin_orig",
        "fin_reply",
        "fresh",
        "isn",
        "key64",
        "last_ack",
        "last_ts",
        "peeked",
        "rows",
    )  # fmt: skip

    def __init__(self, key64: int, isn: int | None) -> None:
        self.key64 = key64
        self.isn = isn  # the client's SYN sequence number; None: opened by later packets
        self.peeked: tuple[int, Finished] | None = None  # (events then, provisional verdict)
        self.rows: list[RowsRef] = []  # raw records
        self.derived: list[np.ndarray] = []  # batch.DERIVED
        self.fresh = 0  # how many of the last chunks are views into the current batch
        self.events = 0
        self.last_ts = 0
        self.fin_orig = _NEVER  # first FIN of each direction
        self.fin_reply = _NEVER
        self.last_ack = 0  # last pure ACK
        self.bits = 0  # _RST_ORIG | _RST_REPLY | _CLIENT_ACK seen
        self.deadline = 0
        self.closed = False

    def done(self) -> bool:
        """Closed by FINs both ways, or by a reset towards the client (or from a client
        that had completed the handshake). The ACK of the last FIN is not waited for: the
        data budget (bpf/hairtrace.h) usually leaves it untraced, and quiet_ns still
        groups it when it comes."""
        bits = self.bits
        if bits & _RST_REPLY or (bits & _RST_ORIG and bits & _CLIENT_ACK):
            return True
        return self.fin_orig != _NEVER and self.fin_reply != _NEVER


@dataclass(eq=False)
class _Pending:
    """Events of a tuple no connection claims yet."""

    rows: list[RowsRef] = field(default_factory=list)
    derived: list[np.ndarray] = field(default_factory=list)
    last_ts: int = 0


class StreamAnalyser:
    """Feed batches in recording order with feed(); call finish() at the end.

    Both return the connections finished by then (Finished: order, conn, diag);
    sorted by `order` they are what analyse() returns for the same events.
    """

    def __init__(
        self,
        ctx: Context,
        codec: RecordCodec,
        *,
        quiet_ns: int = QUIET_NS,
        idle_ns: int | None = None,
        reorder_ns: int = REORDER_NS,
    ) -> None:
        self.ctx, self.codec = ctx, codec
        self.quiet_ns = quiet_ns
        self.reorder_ns = reorder_ns
        # events newer than the latest one seen minus reorder_ns wait here (raw rows and
        # DERIVED, in arrival order) so that events are grouped in time order whatever
        # the batches: CPUs' ring-buffer records, session chunks
        self._late: tuple[np.ndarray, np.ndarray] | None = None
        self._seen_ns = 0  # latest event time seen
        self.idle_ns = idle_ns if idle_ns is not None else ctx.reply_timeout_ns + IDLE_MARGIN_NS
        self.tuples = TupleIds(ctx.service_ip, ctx.service_prefix, ctx.service_addresses)
        self._finalizer = Finalizer(ctx, codec, self.tuples)
        self._peeker = Finalizer(ctx, codec, self.tuples)  # peek()'s: not counted
        self._scope = np.array(sorted(ctx.scope), dtype=np.uint32) if ctx.scope else None
        self._open: dict[int, _Open] = {}
        # tuple -> (connection key, direction): claims by service conntrack entries. A claim
        # holds while its key is open and until _released[key] (idle_ns after its last
        # event); stale ones are purged every idle_ns of trace time.
        self._keys: dict[int, tuple[int, int]] = {}
        self._released: dict[int, int] = {}
        self._confirmed: set[int] = set()  # keys whose conntrack entry was seen confirmed
        self._next_purge = 0
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[int, int, _Open]] = []
        self._seq = count()
        self._closing: list[Closing] = []
        self._touched: list[_Open] = []
        self.watermark = 0  # the time up to which events were grouped and expiry done
        # counters
        self.events = 0
        self.events_out_of_scope = 0
        self.unmatched_events = 0  # in scope, but no connection ever claimed them
        self.held_events = 0  # events of open connections and pending, now
        self.max_held_events = 0
        self.max_open_connections = 0
        self.last_event_ns: int | None = None

    def on_membership(
        self, call: Callable[[tuple[int, int, int], np.ndarray, np.ndarray], None]
    ) -> None:
        """call(order, arrival indices, reply mask) for every connection judged from now on:
        which connection each event is of (its arrival index counts from the first event
        fed), and whether it is on its reply side. For exports."""
        self._finalizer.membership = call

    def set_context(self, ctx: Context) -> None:
        """Judge from now on with ctx: a live trace learns losses, namespaces, drop reason
        names and rule drops as it goes (same service and port as before)."""
        same = ("service_ip", "service_port", "service_prefix")
        assert all(getattr(ctx, k) == getattr(self.ctx, k) for k in same)
        self.ctx = self._finalizer.ctx = self._peeker.ctx = ctx
        self._scope = np.array(sorted(ctx.scope), dtype=np.uint32) if ctx.scope else None

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def tracked_tuples(self) -> int:
        """Entries of the tuple -> connection map (claims of recent connections)."""
        return len(self._keys)

    @property
    def fast_connections(self) -> int:
        """Connections judged healthy from their columns (no packets built)."""
        return self._finalizer.fast

    # ------------------------------------------------------------------ input

    def feed(self, rows: np.ndarray) -> list[Finished]:
        """One batch of raw records (any time order within it and, within reorder_ns,
        across batches)."""
        n = len(rows)
        if not n:
            return []
        cols = self.codec.columns(rows)
        first = self.events
        self.events += n
        top = int(cols.ts.max())
        self.last_event_ns = top if self.last_event_ns is None else max(self.last_event_ns, top)
        self._seen_ns = max(self._seen_ns, top)
        d = derive(cols, first, self.tuples)
        if self._scope is not None:
            inside = np.isin(cols.netns, self._scope)
            if not inside.all():
                sel = np.flatnonzero(inside)
                self.events_out_of_scope += n - len(sel)
                rows, d = self.codec.take(rows, sel), take_derived(d, sel)
        return self._run(rows, d, self._seen_ns - self.reorder_ns)

    def advance(self, now_ns: int) -> list[Finished]:
        """Trace time is at least now_ns (a live trace's clock, minus the records not yet
        drained): group the events up to it, judge what went silent."""
        return self._run(None, None, now_ns)

    def finish(self, end_ns: int | None = None) -> list[Finished]:
        """Every connection still open, judged at end_ns (default: the Context's)."""
        end = self.ctx.end_ns if end_ns is None else end_ns
        done = self._run(None, None, _NEVER - 1, expire=False)
        # those silent past their deadline before the end are judged as of their deadline,
        # as when the trace's clock had passed it (a live trace's last seconds)
        self.watermark = max(self.watermark, end)
        self._expire()
        done += self._flush()
        for conn in list(self._open.values()):
            self._close(conn, end, end)
        self.unmatched_events += sum(sum(map(len, p.derived)) for p in self._pending.values())
        self._pending.clear()
        self.held_events = 0
        return done + self._flush()

    def peek(self) -> list[Finished]:
        """Provisional verdicts of the connections still open, judged as if the trace
        ended now (for a live view; a connection is re-judged only when it grew)."""
        out = []
        for conn in self._open.values():
            if conn.peeked is None or conn.peeked[0] != conn.events:
                key = self.tuples.tuple(conn.key64)
                closing = Closing(conn.key64, key, list(conn.rows), list(conn.derived),
                                  self.watermark, self.watermark, conn.isn)  # fmt: skip
                conn.peeked = (conn.events, self._peeker.run([closing])[0])
            out.append(conn.peeked[1])
        return sorted(out, key=lambda f: f.order[1:])

    def _run(
        self, rows: np.ndarray | None, d: np.ndarray | None, upto: int, *, expire: bool = True
    ) -> list[Finished]:
        """Group, in time order, the waiting events and those of this batch up to `upto`;
        keep the later ones waiting; then expire up to it."""
        late = self._late
        if late is not None:
            if rows is None or d is None:
                rows, d = late
            else:
                rows = self.codec.concat([late[0], rows])
                d = concat_derived([late[1], d])
            self._late = None
            self.held_events -= len(late[1])
        if rows is not None and d is not None and len(d):
            ts = d["ts"]
            cut = np.uint64(max(upto, self.watermark, 0))  # never behind what was grouped
            now = np.flatnonzero(ts <= cut)
            if len(now) < len(d):
                wait = np.flatnonzero(ts > cut)
                self._late = (self.codec.take(rows, wait), take_derived(d, wait).copy())
                self._held(len(wait))
            if len(now):
                d = take_derived(d, now)
                by_time = np.argsort(d["ts"], kind="stable")
                sel, d = now[by_time], take_derived(d, by_time)
                self._learn(d)
                self._assign(rows, sel, d)
        if upto > self.watermark and upto < _NEVER - 1:
            self.watermark = upto
        if expire:
            self._expire()
        self._settle()
        return self._flush()

    # ------------------------------------------------------------- grouping

    def _learn(self, d: np.ndarray) -> None:
        """Claim the tuples of every service conntrack entry, earliest first."""
        if not self.tuples.has_service:
            return
        ct = d["ct"]
        o = d["o"][ct]
        mine = self.tuples.in_service((o >> np.uint64(32)) & np.uint64(TupleIds.ADDR_MASK))
        if self.ctx.service_port:
            mine &= (o & np.uint64(0xFFFF)) == self.ctx.service_port
        o, r, cf = o[mine], d["r"][ct][mine], d["cf"][ct][mine]
        if not len(o):
            return
        # each (entry tuples, confirmed) once, at its earliest event: an entry is seen
        # unconfirmed (its first packet) and then confirmed
        c8 = cf.astype(np.uint64)
        head = np.ones(len(o), dtype=bool)  # entries repeat in runs: one of each run
        head[1:] = (o[1:] != o[:-1]) | (r[1:] != r[:-1]) | (cf[1:] != cf[:-1])
        o, r, c8 = o[head], r[head], c8[head]
        by_pair = np.lexsort((c8, r, o))  # stable: each pair's first entry is its earliest
        os, rs, cs = o[by_pair], r[by_pair], c8[by_pair]
        new = np.ones(len(os), dtype=bool)
        new[1:] = (os[1:] != os[:-1]) | (rs[1:] != rs[:-1]) | (cs[1:] != cs[:-1])
        firsts = np.sort(by_pair[new])
        o, r, c8 = o[firsts], r[firsts], c8[firsts]
        rev = self.tuples.reverse
        keys, live, released, now = self._keys, self._open, self._released, self.watermark
        pending, confirmed = self._pending, self._confirmed
        for ok, rok, rk, rrk, conf in zip(
            o.tolist(), rev(o).tolist(), r.tolist(), rev(r).tolist(), c8.tolist(), strict=True
        ):
            if ok not in live and released.get(ok, -1) < now + self.idle_ns:
                # its claims hold until then, or it opens (a port reused after its last
                # connection was released gets its claims back)
                released[ok] = now + self.idle_ns
            if conf:
                confirmed.add(ok)
            fwd, back = (ok, _ORIGINAL), (ok, _REPLY)
            for t, hit in ((ok, fwd), (rok, back), (rk, back), (rrk, fwd)):
                old = keys.get(t)  # a claim that still holds wins (see _key_of) ...
                holds = old is not None and (old[0] in live or released.get(old[0], -1) >= now)
                # ... unless it is an entry that was never confirmed and this one is: two
                # entries with one reply tuple (a NAT clash) where the first to be seen
                # lost (its packet was dropped at confirm), the other owns the tuple ...
                if holds and conf and old is not None and old[0] != ok and old[0] not in confirmed:
                    holds = False
                # ... but events that waited for this key's tuple join it all the same
                if holds and (old is None or old[0] != ok or t not in pending):
                    continue
                keys[t] = hit
                if pending:
                    waiting = pending.pop(t, None)
                    if waiting is not None:
                        self._adopt(ok, hit[1], waiting)

    def _owned_elsewhere(
        self,
        d: np.ndarray,
        run_at: np.ndarray,
        inv: np.ndarray,
        ukey: np.ndarray,
        known: np.ndarray,
    ) -> np.ndarray | None:
        """Events that carry a service conntrack entry whose original tuple (its
        connection's key) is not the connection their tuple is claimed by, or is claimed
        by none, and whose tuple is one of that entry's: they belong to their entry's
        connection (two entries with one reply tuple, a NAT clash, share the tuple but
        not the packets). None when none. (Events come in runs of one tuple: run_at,
        inv, ukey, known are _assign's.)"""
        if not self.tuples.has_service:
            return None
        cand = np.flatnonzero(d["ct"])
        if not len(cand):
            return None
        o = d["o"][cand]
        mine = self.tuples.in_service((o >> np.uint64(32)) & np.uint64(TupleIds.ADDR_MASK))
        if self.ctx.service_port:
            mine &= (o & np.uint64(0xFFFF)) == self.ctx.service_port
        cand, o = cand[mine], o[mine]
        run = inv[np.searchsorted(run_at, cand, side="right") - 1]
        off = ~known[run] | (ukey[run] != o)
        if not off.any():
            return None
        cand, o = cand[off], o[off]
        # only events whose tuple is one of their entry's four (as claims are made): a
        # packet between DNAT and SNAT has a tuple of neither direction
        t, r, rev = d["t"][cand], d["r"][cand], TupleIds.reverse
        cand = cand[(t == o) | (t == rev(o)) | (t == r) | (t == rev(r))]
        return cand if len(cand) else None

    def _key_of(self, t: int) -> tuple[int, int] | None:
        """(connection key, direction) of tuple t: the claim of a service conntrack entry
        while it holds (its key is open, or closed less than idle_ns ago), else t itself
        when addressed to the service, or reversed when from it; None when neither."""
        hit = self._keys.get(t)
        if hit is not None and (
            hit[0] in self._open or self._released.get(hit[0], -1) >= self.watermark
        ):
            return hit
        tuples, port = self.tuples, self.ctx.service_port
        if not tuples.has_service:
            return None
        m, svc = TupleIds.ADDR_MASK, tuples.is_service_id
        if svc((t >> 32) & m) and (not port or t & 0xFFFF == port):
            return t, _ORIGINAL
        if svc((t >> 48) & m) and (not port or (t >> 16) & 0xFFFF == port):
            return self.tuples.reverse(t), _REPLY
        return None

    def _assign(self, rows: np.ndarray, sel: np.ndarray, d: np.ndarray) -> None:
        """Append each event (in time order) to its connection; hold those without one."""
        t, n = d["t"], len(d)
        head = np.ones(n, dtype=bool)  # events come in runs of one tuple: key each run once
        head[1:] = t[1:] != t[:-1]
        run_at = np.flatnonzero(head)
        run_len = np.diff(np.append(run_at, n))
        uniq, inv = np.unique(t[run_at], return_inverse=True)
        ukey = np.zeros(len(uniq), dtype=np.uint64)
        uside = np.zeros(len(uniq), dtype=np.int8)
        known = np.ones(len(uniq), dtype=bool)
        key_of = self._key_of
        for j, tk in enumerate(uniq.tolist()):
            hit = key_of(tk)
            if hit is None:
                known[j] = False
            else:
                ukey[j], uside[j] = hit
        moved = self._owned_elsewhere(d, run_at, inv, ukey, known)
        if moved is not None:  # rare (a NAT clash): key each event on its own
            ev_key = np.repeat(ukey[inv], run_len)
            ev_side = np.repeat(uside[inv], run_len)
            ev_known = np.repeat(known[inv], run_len)
            o, tt, rr = d["o"][moved], d["t"][moved], d["r"][moved]
            ev_key[moved] = o
            ev_side[moved] = np.where((tt == o) | (tt == TupleIds.reverse(rr)), _ORIGINAL, _REPLY)
            ev_known[moved] = True
            if not ev_known.all():
                self._hold(rows, sel[~ev_known], d[~ev_known])
            idx = np.flatnonzero(ev_known)
            if not len(idx):
                return
            ev = idx[np.argsort(ev_key[idx], kind="stable")]
            src, ev_key, side = sel[ev], ev_key[ev], ev_side[ev]
            d = take_derived(d, ev)
            head_key = np.ones(len(ev), dtype=bool)
            head_key[1:] = ev_key[1:] != ev_key[:-1]
            starts = np.flatnonzero(head_key)
            ends = np.append(starts[1:], len(ev))
            at_client = _at_client(d["t"], ev_key)
            keys = ev_key[starts].tolist()
        else:
            if not known.all():
                lost = ~np.repeat(known[inv], run_len)
                self._hold(rows, sel[lost], d[lost])
                keep = known[inv]
                run_at, run_len, inv = run_at[keep], run_len[keep], inv[keep]
                if not len(run_at):
                    return
            # runs grouped by connection (stable: time order kept), then back to events
            by_key = np.argsort(ukey[inv], kind="stable")
            run_at, run_len, inv = run_at[by_key], run_len[by_key], inv[by_key]
            run_key = ukey[inv]
            offset = np.cumsum(run_len) - run_len
            ev = np.repeat(run_at - offset, run_len) + np.arange(int(run_len.sum()))
            src = sel[ev]
            d = take_derived(d, ev)
            new_key = np.ones(len(run_key), dtype=bool)
            new_key[1:] = run_key[1:] != run_key[:-1]
            starts = offset[new_key]
            ends = np.append(starts[1:], len(ev))
            side = np.repeat(uside[inv], run_len)
            at_client = _at_client(d["t"], np.repeat(run_key, run_len))
            keys = run_key[new_key].tolist()
        stats = _group_stats(d["flags"], d["ts"], side, at_client, starts, ends)
        # client SYNs: where a new handshake (a new ISN) may start a new connection
        syn_at = np.flatnonzero(((d["flags"] & (SYN | ACK | RST)) == SYN) & (side == _ORIGINAL))
        first_syn = np.searchsorted(syn_at, starts).tolist()
        n_syn = len(syn_at)
        syn_l = syn_at.tolist()
        for g, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            j = first_syn[g]
            if j >= n_syn or syn_l[j] >= e:
                self._append(keys[g], (rows, src[s:e]), d[s:e], stats[g], fresh=True)
                continue
            syns = []
            while j < n_syn and syn_l[j] < e:
                syns.append(syn_l[j])
                j += 1
            self._handshakes(keys[g], rows, src, d, (side, at_client), s, e, syns)

    def _handshakes(
        self,
        key64: int,
        rows: np.ndarray,
        src: np.ndarray,
        d: np.ndarray,
        sides: tuple[np.ndarray, np.ndarray],
        s: int,
        e: int,
        syns: list[int],
    ) -> None:
        """Events s..e of one key that hold client SYNs: a SYN whose sequence number is
        not the open connection's ISN ends that connection and opens the next one."""
        conn = self._open.get(key64)
        if conn is not None and int(d["ts"][s]) > conn.deadline:
            self._close(conn, conn.deadline, conn.deadline)
            conn = None
        isn = conn.isn if conn is not None else None
        exists = conn is not None
        seq, ts = d["seq"], d["ts"]
        seg, seg_isn = s, None
        for i in syns:
            sq = int(seq[i])
            if exists and isn == sq:
                continue  # a retransmission, or the same SYN at another point
            if i > seg:
                self._append_part(key64, rows, src, d, sides, seg, i, seg_isn)
                exists = True
            if exists:
                self._cut(key64, int(ts[i]))
            seg, seg_isn, isn, exists = i, sq, sq, True
        self._append_part(key64, rows, src, d, sides, seg, e, seg_isn)

    def _append_part(
        self,
        key64: int,
        rows: np.ndarray,
        src: np.ndarray,
        d: np.ndarray,
        sides: tuple[np.ndarray, np.ndarray],
        s: int,
        e: int,
        isn: int | None,
    ) -> None:
        part = d[s:e]
        at = np.zeros(1, dtype=np.int64)
        side, at_client = sides
        stats = _group_stats(
            part["flags"], part["ts"], side[s:e], at_client[s:e], at, np.array([e - s])
        )
        self._append(key64, (rows, src[s:e]), part, stats[0], fresh=True, isn=isn)

    def _cut(self, key64: int, at_ns: int) -> None:
        """A new handshake on key64 at at_ns: its open connection is over. It is judged as
        if the trace had gone on for a reply timeout after its last event (or to at_ns);
        if it was over before (silent past its deadline), as of then, as it would have
        been had the batch ended between the two."""
        conn = self._open.get(key64)
        if conn is None:
            return
        if at_ns > conn.deadline:
            self._close(conn, conn.deadline, conn.deadline)
        else:
            self._close(conn, max(at_ns, conn.last_ts + self.ctx.reply_timeout_ns), at_ns)

    def _append(
        self,
        key64: int,
        rows: RowsRef,
        d: np.ndarray,
        stats: list[int],
        *,
        fresh: bool,
        isn: int | None = None,
    ) -> None:
        """Events of key64's open connection (a new one, with isn, when none is open)."""
        first, last, fin_o, fin_r, ack, bits = stats
        conn = self._open.get(key64)
        if conn is not None and first > conn.deadline:
            # silent past its deadline: that one is over
            self._close(conn, conn.deadline, conn.deadline)
            conn = None
        if conn is None:
            conn = self._open[key64] = _Open(key64, isn)
            if key64 in self._released:
                del self._released[key64]
            self.max_open_connections = max(self.max_open_connections, len(self._open))
        conn.rows.append(rows)
        conn.derived.append(d)
        if fresh:
            if not conn.fresh:
                self._touched.append(conn)
            conn.fresh += 1
        n = len(d)
        conn.events += n
        self.held_events += n
        self.max_held_events = max(self.max_held_events, self.held_events)
        conn.last_ts = max(conn.last_ts, last)
        conn.fin_orig = min(conn.fin_orig, fin_o)
        conn.fin_reply = min(conn.fin_reply, fin_r)
        conn.last_ack = max(conn.last_ack, ack)
        conn.bits |= bits
        deadline = conn.last_ts + (self.quiet_ns if conn.done() else self.idle_ns)
        if deadline != conn.deadline:
            conn.deadline = deadline
            heapq.heappush(self._deadlines, (deadline, next(self._seq), conn))

    def _hold(self, rows: np.ndarray, idx: np.ndarray, d: np.ndarray) -> None:
        """Keep events no connection claims yet, by tuple, until one does or idle_ns passes."""
        by_t = np.argsort(d["t"], kind="stable")
        idx, d = idx[by_t], take_derived(d, by_t)
        t64 = d["t"]
        starts = np.flatnonzero(np.concatenate(([True], t64[1:] != t64[:-1])))
        ends = np.append(starts[1:], len(idx))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            p = self._pending.setdefault(int(t64[s]), _Pending())
            p.rows.append((self.codec.take(rows, idx[s:e]), None))
            p.derived.append(d[s:e].copy())
            p.last_ts = max(p.last_ts, int(d["ts"][s:e].max()))
            self._held(e - s)

    def _adopt(self, key64: int, side: int, waiting: _Pending) -> None:
        """Events that waited for their tuple's connection join it."""
        rows = rows_from(self.codec, waiting.rows)
        d = concat_derived(waiting.derived)
        self.held_events -= len(d)
        by_time = np.argsort(d["ts"], kind="stable")
        rows, d = self.codec.take(rows, by_time), take_derived(d, by_time)
        sides = np.full(len(d), side, dtype=np.int8)
        ends = np.array([len(d)])
        key = np.full(len(d), key64, dtype=np.uint64)
        stats = _group_stats(
            d["flags"], d["ts"], sides, _at_client(d["t"], key), np.zeros(1, dtype=np.int64), ends
        )
        syn = np.flatnonzero((d["flags"] & (SYN | ACK | RST)) == SYN)
        isn = int(d["seq"][syn[0]]) if side == _ORIGINAL and len(syn) else None
        self._append(key64, (rows, None), d, stats[0], fresh=False, isn=isn)

    def _held(self, n: int) -> None:
        self.held_events += n
        self.max_held_events = max(self.max_held_events, self.held_events)

    def _settle(self) -> None:
        """Connections still open keep copies of this batch's rows, not views into it,
        so that a long connection does not keep every batch it touched alive."""
        take = self.codec.take
        for conn in self._touched:
            if not conn.closed:
                for i in range(len(conn.rows) - conn.fresh, len(conn.rows)):
                    src, idx = conn.rows[i]
                    if idx is not None:
                        conn.rows[i] = (take(src, idx), None)
                    conn.derived[i] = conn.derived[i].copy()
            conn.fresh = 0
        self._touched = []

    # ---------------------------------------------------------------- expiry

    def _expire(self) -> None:
        now, heap = self.watermark, self._deadlines
        while heap and heap[0][0] < now:
            deadline, _seq, conn = heapq.heappop(heap)
            if not conn.closed and conn.deadline == deadline:
                self._close(conn, deadline, deadline)
        if now >= self._next_purge:
            self._next_purge = now + self.idle_ns
            live, released = self._open, {k: at for k, at in self._released.items() if at >= now}
            self._released = released
            self._confirmed = {k for k in self._confirmed if k in live or k in released}
            self._keys = {
                t: hit
                for t, hit in self._keys.items()
                if hit[0] in live or released.get(hit[0], -1) >= now
            }
        stale = [t for t, p in self._pending.items() if p.last_ts + self.idle_ns < now]
        for t in stale:
            n = sum(map(len, self._pending.pop(t).derived))
            self.unmatched_events += n
            self.held_events -= n

    def _close(self, conn: _Open, end_ns: int, close_ns: int) -> None:
        """conn is over, known at close_ns; diagnose() judges it at end_ns."""
        conn.closed = True
        del self._open[conn.key64]
        self.held_events -= conn.events
        self._released[conn.key64] = conn.last_ts + self.idle_ns
        key = self.tuples.tuple(conn.key64)
        self._closing.append(
            Closing(conn.key64, key, conn.rows, conn.derived, end_ns, close_ns, conn.isn)
        )

    def _flush(self) -> list[Finished]:
        """The connections closed since the last call, in judgment order."""
        closing, self._closing = self._closing, []
        return sorted(self._finalizer.run(closing), key=lambda f: f.order)


def _at_client(t: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Events whose tuple is their connection's key or its reverse: the packet as the
    client's socket sends or gets it (before DNAT, after the reply's reverse NAT)."""
    return (t == key) | (t == TupleIds.reverse(key))


def _group_stats(
    flags: np.ndarray,
    ts: np.ndarray,
    side: np.ndarray,
    at_client: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
) -> list[list[int]]:
    """Per group of consecutive events in time order: first and last time, first FIN of
    each direction, last pure ACK, and bits: _RST_ORIG, _RST_REPLY, _CLIENT_ACK.

    Only a reset the client's socket sends or gets (at_client) ends a connection: the
    client's RST to a reply that was not translated back (it answers a 4-tuple it does
    not know), or a reset that reaches it untranslated, leave its connection open, and
    the retransmissions that follow stay in it."""
    orig = side == _ORIGINAL
    rst_own = ((flags & RST) != 0) & at_client
    fin = (flags & FIN) != 0
    acks = (flags & ACK) != 0
    never = np.uint64(_NEVER)
    fin_o = np.minimum.reduceat(np.where(fin & orig, ts, never), starts)
    fin_r = np.minimum.reduceat(np.where(fin & ~orig, ts, never), starts)
    pure_ack = acks & ((flags & (SYN | FIN | RST)) == 0)
    last_ack = np.maximum.reduceat(np.where(pure_ack, ts, np.uint64(0)), starts)
    bits = (
        (rst_own & orig).astype(np.uint64) * _RST_ORIG
        | (rst_own & ~orig).astype(np.uint64) * _RST_REPLY
        | (acks & ((flags & (SYN | RST)) == 0) & orig).astype(np.uint64) * _CLIENT_ACK
    )
    any_bits = np.bitwise_or.reduceat(bits, starts)
    cols = (ts[starts], ts[ends - 1], fin_o, fin_r, last_ack, any_bits)
    rows: list[list[int]] = np.stack(cols, axis=1).tolist()
    return rows


def analyse_stream(
    batches: Iterable[np.ndarray], ctx: Context, codec: RecordCodec, **limits: int
) -> list[tuple[Connection, Diagnosis]]:
    """Every connection of batches of raw records, in the order the engine judged them.
    limits: quiet_ns, idle_ns, reorder_ns of StreamAnalyser."""
    analyser = StreamAnalyser(ctx, codec, **limits)
    done: list[Finished] = []
    for rows in batches:
        done += analyser.feed(rows)
    done += analyser.finish()
    return [(f.conn, f.diag) for f in done]
