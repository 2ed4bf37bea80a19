"""Decoding of struct ht_event (bpf/hairtrace.h) into model events.

The byte layout below is the contract; tests/kernel/test_events.py checks it
against the BTF of the compiled object.
"""

from __future__ import annotations

import gc
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from tracer.errors import HairtraceError
from tracer.events.model import Conntrack, Event, Tuple

EVENT_SIZE = 128
HT_CT_PRESENT, HT_CT_UNTRACKED = 0x01, 0x02

# field name -> (offset, size), mirrored from struct ht_event
LAYOUT: dict[str, tuple[int, int]] = {
    "ts_ns": (0, 8),
    "skb": (8, 8),
    "ct_id": (16, 8),
    "location": (24, 8),
    "netns": (32, 4),
    "ifindex": (36, 4),
    "point": (40, 2),
    "hook": (42, 1),
    "tcp_flags": (43, 1),
    "nf_prio": (44, 4),
    "pkt": (48, 12),
    "seq": (60, 4),
    "ack_seq": (64, 4),
    "ip_id": (68, 2),
    "ct_flags": (70, 1),
    "ctinfo": (71, 1),
    "ct_status": (72, 4),
    "reason": (76, 4),
    "ct_orig": (80, 12),
    "ct_reply": (92, 12),
    "aux": (104, 4),
    "proto": (108, 1),
    "inner_proto": (109, 1),
    "icmp_type": (110, 1),
    "icmp_code": (111, 1),
    "dev": (112, 16),
}

_EVENT = struct.Struct("<QQQQIIHBBi12sIIHBBII12s12sIBBBB16s")
_TUPLE = struct.Struct("!4s4sHH")
assert _EVENT.size == EVENT_SIZE

# numpy types of the LAYOUT fields (struct ht_tuple in network byte order)
_TUPLE_DTYPE = np.dtype([("saddr", ">u4"), ("daddr", ">u4"), ("sport", ">u2"), ("dport", ">u2")])
_TYPES: dict[str, Any] = {
    "ts_ns": "<u8", "skb": "<u8", "ct_id": "<u8", "location": "<u8", "netns": "<u4",
    "ifindex": "<u4", "point": "<u2", "hook": "u1", "tcp_flags": "u1", "nf_prio": "<i4",
    "pkt": _TUPLE_DTYPE, "seq": "<u4", "ack_seq": "<u4", "ip_id": "<u2", "ct_flags": "u1",
    "ctinfo": "u1", "ct_status": "<u4", "reason": "<u4", "ct_orig": _TUPLE_DTYPE,
    "ct_reply": _TUPLE_DTYPE, "aux": "<u4", "proto": "u1", "inner_proto": "u1",
    "icmp_type": "u1", "icmp_code": "u1", "dev": "S16",
}  # fmt: skip
# struct ht_event as a numpy structured dtype, offsets from LAYOUT (padding left out)
EVENT_DTYPE = np.dtype(
    {
        "names": list(_TYPES),
        "formats": list(_TYPES.values()),
        "offsets": [LAYOUT[name][0] for name in _TYPES],
        "itemsize": EVENT_SIZE,
    }
)
assert all(EVENT_DTYPE.fields[n][0].itemsize == LAYOUT[n][1] for n in _TYPES)  # type: ignore[index]


def decode_tuple(raw: bytes) -> Tuple:
    saddr, daddr, sport, dport = _TUPLE.unpack(raw)
    return Tuple(socket.inet_ntoa(saddr), sport, socket.inet_ntoa(daddr), dport)


def decode(raw: bytes) -> Event:
    """One ring-buffer record -> Event."""
    (
        ts,
        skb,
        ct_id,
        location,
        netns,
        ifindex,
        point,
        hook,
        flags,
        prio,
        pkt,
        seq,
        ack,
        ip_id,
        ct_flags,
        ctinfo,
        ct_status,
        reason,
        ct_orig,
        ct_reply,
        aux,
        proto,
        inner_proto,
        icmp_type,
        icmp_code,
        dev,
    ) = _EVENT.unpack_from(raw)
    ct = None
    if ct_flags & HT_CT_PRESENT:
        ct = Conntrack(ct_id, ct_status, ctinfo, decode_tuple(ct_orig), decode_tuple(ct_reply))
    return Event(
        ts_ns=ts,
        point=point,
        netns=netns,
        ifindex=ifindex,
        dev=dev.split(b"\0", 1)[0].decode(errors="replace"),
        tuple=decode_tuple(pkt),
        proto=proto,
        tcp_flags=flags,
        seq=seq,
        ack_seq=ack,
        ip_id=ip_id,
        skb=skb,
        hook=hook,
        nf_prio=prio,
        ct=ct,
        untracked=bool(ct_flags & HT_CT_UNTRACKED),
        reason=reason,
        location=location,
        aux=aux,
        inner_proto=inner_proto,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
    )


def encode_tuple(t: Tuple) -> bytes:
    return _TUPLE.pack(socket.inet_aton(t.src), socket.inet_aton(t.dst), t.sport, t.dport)


_NO_TUPLE = bytes(12)


def encode(ev: Event) -> bytes:
    """Event -> the record decode() reads it from (for events built in Python: tests,
    the in-memory analyse())."""
    ct = ev.ct
    flags = (HT_CT_PRESENT if ct is not None else 0) | (HT_CT_UNTRACKED if ev.untracked else 0)
    return _EVENT.pack(
        ev.ts_ns,
        ev.skb,
        ct.id if ct is not None else 0,
        ev.location,
        ev.netns,
        ev.ifindex,
        ev.point,
        ev.hook,
        ev.tcp_flags,
        ev.nf_prio,
        encode_tuple(ev.tuple),
        ev.seq,
        ev.ack_seq,
        ev.ip_id,
        flags,
        ct.ctinfo if ct is not None else 0,
        ct.status if ct is not None else 0,
        ev.reason,
        encode_tuple(ct.orig) if ct is not None else _NO_TUPLE,
        encode_tuple(ct.reply) if ct is not None else _NO_TUPLE,
        ev.aux,
        ev.proto,
        ev.inner_proto,
        ev.icmp_type,
        ev.icmp_code,
        ev.dev.encode()[:16],
    )


def decode_all(records: Iterable[bytes]) -> list[Event]:
    """Decode a batch; a short record means the object and this mirror disagree."""
    out = []
    for r in records:
        if len(r) < EVENT_SIZE:
            raise HairtraceError(
                f"ring-buffer record of {len(r)} bytes, expected {EVENT_SIZE}: "
                "BPF object and tracer version do not match"
            )
        out.append(decode(r))
    return out


def _interned(values: list[Any], convert: Callable[[Any], Any]) -> list[Any]:
    """convert() applied once per distinct value, the results spread back in order."""
    table = {v: convert(v) for v in dict.fromkeys(values)}
    return list(map(table.__getitem__, values))


def _dev_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _tuples(col: np.ndarray) -> list[Tuple]:
    """Tuple objects for a column of struct ht_tuple (one object per distinct tuple)."""
    return _interned(col.view("V12").tolist(), decode_tuple)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while building many acyclic objects (it would rescan them all)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def decode_batch(batch: np.ndarray | bytes | memoryview) -> list[Event]:
    """Decode records back to back (a (n, EVENT_SIZE) uint8 array or bytes) column-wise.

    The same events as decode_all over the single records, built from numpy
    columns: distinct addresses, tuples and device names are converted once.
    """
    flat = np.frombuffer(batch, dtype=np.uint8) if not isinstance(batch, np.ndarray) else batch
    flat = np.ascontiguousarray(flat, dtype=np.uint8).reshape(-1)
    if len(flat) % EVENT_SIZE:
        raise HairtraceError(
            f"ring-buffer batch of {len(flat)} bytes is not made of {EVENT_SIZE}-byte records: "
            "BPF object and tracer version do not match"
        )
    rec = flat.view(EVENT_DTYPE)
    if not len(rec):
        return []
    with _gc_paused():
        return _decode_columns(rec)


def _decode_columns(rec: np.ndarray) -> list[Event]:
    n = len(rec)
    ct_flags = rec["ct_flags"]
    cts: list[Conntrack | None] = [None] * n
    has_ct = np.flatnonzero(ct_flags & HT_CT_PRESENT)
    if len(has_ct):
        sub = rec[has_ct]
        made = map(
            Conntrack,
            sub["ct_id"].tolist(),
            sub["ct_status"].tolist(),
            sub["ctinfo"].tolist(),
            _tuples(sub["ct_orig"]),
            _tuples(sub["ct_reply"]),
        )
        for i, ct in zip(has_ct.tolist(), made, strict=True):
            cts[i] = ct
    return list(
        map(
            Event,
            rec["ts_ns"].tolist(),
            rec["point"].tolist(),
            rec["netns"].tolist(),
            rec["ifindex"].tolist(),
            _interned(rec["dev"].tolist(), _dev_name),
            _tuples(rec["pkt"]),
            rec["proto"].tolist(),
            rec["tcp_flags"].tolist(),
            rec["seq"].tolist(),
            rec["ack_seq"].tolist(),
            rec["ip_id"].tolist(),
            rec["skb"].tolist(),
            rec["hook"].tolist(),
            rec["nf_prio"].tolist(),
            cts,
            ((ct_flags & HT_CT_UNTRACKED) != 0).tolist(),
            rec["reason"].tolist(),
            rec["location"].tolist(),
            rec["aux"].tolist(),
            rec["inner_proto"].tolist(),
            rec["icmp_type"].tolist(),
            rec["icmp_code"].tolist(),
        )
    )
