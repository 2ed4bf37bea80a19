"""Decoding of struct ht_event (bpf/hairtrace.h) into model events.

The byte layout below is the contract; tests/kernel/test_events.py checks it
against the BTF of the compiled object.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

from tracer.analysis.model import Conntrack, Event, Tuple
from tracer.errors import HairtraceError

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
    "_pad": (109, 3),
    "dev": (112, 16),
}

_EVENT = struct.Struct("<QQQQIIHBBi12sIIHBBII12s12sIB3x16s")
_TUPLE = struct.Struct("!4s4sHH")
assert _EVENT.size == EVENT_SIZE


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
