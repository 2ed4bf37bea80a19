"""Raw struct ht_event records as numpy rows, for the streaming analysis.

A batch of records (a ring-buffer drain or a session chunk) becomes one numpy
structured array without copying (EVENT_DTYPE, the mirror of bpf/hairtrace.h);
CODEC turns rows into the host-order columns tracer.analysis.stream reads, and
decodes rows into Event objects only when a connection needs a full diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracer.errors import HairtraceError
from tracer.events.codec import EVENT_DTYPE, EVENT_SIZE, HT_CT_PRESENT, LAYOUT, decode_batch
from tracer.events.model import (
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPS_CONFIRMED,
    Event,
    Point,
)


@dataclass(frozen=True)
class EventColumns:
    """One entry per event, except the o_* / r_* fields (the conntrack original and reply
    tuples): one entry per event that has_ct, in order. Addresses are IPv4 as unsigned
    ints (a.b.c.d = a<<24|...); ports are sport<<16 | dport."""

    ts: np.ndarray  # uint64
    netns: np.ndarray  # uint32
    flags: np.ndarray  # uint8, TCP flags
    seq: np.ndarray  # uint32, TCP sequence number (a client SYN's is its ISN)
    saddr: np.ndarray  # uint32
    daddr: np.ndarray
    ports: np.ndarray  # uint32
    has_ct: np.ndarray  # bool
    o_saddr: np.ndarray
    o_daddr: np.ndarray
    o_ports: np.ndarray
    r_saddr: np.ndarray
    r_daddr: np.ndarray
    r_ports: np.ndarray
    udp: np.ndarray | None = None  # bool, of the flow; None: every event is TCP
    confirmed: np.ndarray | None = None  # bool per has_ct event: the entry is CONFIRMED
    # bool: a drop (kfree_skb) or an ICMP error: its connection needs the full diagnosis
    special: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ts)


@dataclass(frozen=True)
class EventFields:
    """Every field of the events that a report shows, one entry per event (what Event
    holds, as arrays): for writing many connections without building their objects.
    Addresses as in EventColumns, ports host order, dev the raw 16 bytes."""

    ts: np.ndarray
    point: np.ndarray
    netns: np.ndarray
    dev: np.ndarray  # S16
    saddr: np.ndarray
    daddr: np.ndarray
    sport: np.ndarray
    dport: np.ndarray
    flags: np.ndarray
    seq: np.ndarray
    ack: np.ndarray
    ip_id: np.ndarray
    reason: np.ndarray
    has_ct: np.ndarray
    ct_id: np.ndarray
    ct_status: np.ndarray
    ctinfo: np.ndarray
    o_saddr: np.ndarray
    o_daddr: np.ndarray
    o_sport: np.ndarray
    o_dport: np.ndarray
    r_saddr: np.ndarray
    r_daddr: np.ndarray
    r_sport: np.ndarray
    r_dport: np.ndarray
    proto: np.ndarray | None = None  # uint8 IPPROTO_* (1: an ICMP error); None: all TCP
    inner_proto: np.ndarray | None = None
    icmp_type: np.ndarray | None = None
    icmp_code: np.ndarray | None = None


_OPAQUE = np.dtype(f"V{EVENT_SIZE}")  # a record as one opaque item: fast to gather and copy


def rows_of(payload: bytes | memoryview | np.ndarray, record_size: int = EVENT_SIZE) -> np.ndarray:
    """Records back to back -> rows (one opaque item per record; a view of payload when
    record_size is EVENT_SIZE), what CODEC reads."""
    size = payload.nbytes if isinstance(payload, np.ndarray | memoryview) else len(payload)
    if record_size < EVENT_SIZE or size % record_size:
        raise HairtraceError(
            f"a batch of {size} bytes is not made of {record_size}-byte records "
            f"of at least {EVENT_SIZE} bytes: BPF object and tracer version do not match"
        )
    flat = np.frombuffer(payload, dtype=np.uint8)  # an array: its bytes (C-contiguous)
    if record_size != EVENT_SIZE:  # a newer recorder's longer records: keep the known part
        flat = np.ascontiguousarray(flat.reshape(-1, record_size)[:, :EVENT_SIZE]).reshape(-1)
    return flat.view(_OPAQUE)


def _fields() -> np.dtype:
    """The fields the columns come from, each port pair as one big-endian u32."""
    names, formats, offsets = [], [], []
    own = (("ts_ns", "<u8"), ("netns", "<u4"), ("tcp_flags", "u1"), ("ct_flags", "u1"),
           ("seq", "<u4"), ("proto", "u1"), ("inner_proto", "u1"),
           ("ct_status", "<u4"), ("point", "<u2"))  # fmt: skip
    for name, typ in own:
        names.append(name)
        formats.append(typ)
        offsets.append(LAYOUT[name][0])
    for tup in ("pkt", "ct_orig", "ct_reply"):
        base = LAYOUT[tup][0]  # struct ht_tuple: saddr, daddr, sport, dport
        for part, delta in (("saddr", 0), ("daddr", 4), ("ports", 8)):
            names.append(f"{tup}_{part}")
            formats.append(">u4")
            offsets.append(base + delta)
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": EVENT_SIZE}
    )


_FIELDS = _fields()


class _Codec:
    """tracer.analysis.batch.RecordCodec over rows from rows_of."""

    def columns(self, rows: np.ndarray) -> EventColumns:
        rec = rows.view(_FIELDS)
        has_ct = (rec["ct_flags"] & HT_CT_PRESENT) != 0
        ct = np.flatnonzero(has_ct)
        u32 = np.uint32

        def host(name: str) -> np.ndarray:
            return rec[name].astype(u32)

        def of_ct(name: str) -> np.ndarray:
            return rec[name][ct].astype(u32)

        saddr, daddr, ports = host("pkt_saddr"), host("pkt_daddr"), host("pkt_ports")
        proto = rec["proto"]
        udp = None
        if (proto != IPPROTO_TCP).any():
            icmp = proto == IPPROTO_ICMP
            udp = np.where(icmp, rec["inner_proto"], proto) == IPPROTO_UDP
            if icmp.any():  # an ICMP error travels back along the packet it quotes
                saddr, daddr = np.where(icmp, daddr, saddr), np.where(icmp, saddr, daddr)
                ports = np.where(icmp, (ports >> u32(16)) | (ports << u32(16)), ports)
        return EventColumns(  # fields already in host order stay views (read once, later)
            ts=rec["ts_ns"],
            netns=rec["netns"],
            flags=rec["tcp_flags"],
            seq=rec["seq"],
            saddr=saddr,
            daddr=daddr,
            ports=ports,
            has_ct=has_ct,
            o_saddr=of_ct("ct_orig_saddr"),
            o_daddr=of_ct("ct_orig_daddr"),
            o_ports=of_ct("ct_orig_ports"),
            r_saddr=of_ct("ct_reply_saddr"),
            r_daddr=of_ct("ct_reply_daddr"),
            r_ports=of_ct("ct_reply_ports"),
            udp=udp,
            confirmed=(rec["ct_status"][ct] & IPS_CONFIRMED) != 0,
            special=(rec["point"] == Point.DROP) | (proto == IPPROTO_ICMP),
        )

    def fields(self, rows: np.ndarray) -> EventFields:
        rec = rows.view(EVENT_DTYPE)
        pkt, orig, reply = rec["pkt"], rec["ct_orig"], rec["ct_reply"]
        u32, u16 = np.uint32, np.uint16
        return EventFields(
            ts=rec["ts_ns"],
            point=rec["point"],
            netns=rec["netns"],
            dev=rec["dev"],
            saddr=pkt["saddr"].astype(u32),
            daddr=pkt["daddr"].astype(u32),
            sport=pkt["sport"].astype(u16),
            dport=pkt["dport"].astype(u16),
            flags=rec["tcp_flags"],
            seq=rec["seq"],
            ack=rec["ack_seq"],
            ip_id=rec["ip_id"],
            reason=rec["reason"],
            has_ct=(rec["ct_flags"] & HT_CT_PRESENT) != 0,
            ct_id=rec["ct_id"],
            ct_status=rec["ct_status"],
            ctinfo=rec["ctinfo"],
            o_saddr=orig["saddr"].astype(u32),
            o_daddr=orig["daddr"].astype(u32),
            o_sport=orig["sport"].astype(u16),
            o_dport=orig["dport"].astype(u16),
            r_saddr=reply["saddr"].astype(u32),
            r_daddr=reply["daddr"].astype(u32),
            r_sport=reply["sport"].astype(u16),
            r_dport=reply["dport"].astype(u16),
            proto=rec["proto"],
            inner_proto=rec["inner_proto"],
            icmp_type=rec["icmp_type"],
            icmp_code=rec["icmp_code"],
        )

    def events(self, rows: np.ndarray) -> list[Event]:
        return decode_batch(np.ascontiguousarray(rows).view(np.uint8))

    def take(self, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return rows[idx]

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


CODEC = _Codec()
