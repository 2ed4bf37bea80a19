"""Events as columns: what the streaming analysis reads from a batch of raw records.

The analysis never decodes records itself (that is tracer.kernel's job); it is
handed rows (a numpy array of raw records, opaque here) and a RecordCodec that
turns rows into EventColumns (host-order arrays of what grouping and the healthy
check read), EventFields (everything a report shows) or, for the connections
that need a full diagnosis, Event objects. DERIVED is what the analysis keeps
per event of an open connection; TupleIds packs 4-tuples into integers.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol

import numpy as np

from tracer.errors import HairtraceError
from tracer.events.model import Event, Tuple
from tracer.events.rows import EventColumns, EventFields


class RecordCodec(Protocol):
    """How the analysis reads rows of raw records (tracer.events.rows.CODEC; tests may
    give their own)."""

    def columns(self, rows: np.ndarray) -> EventColumns: ...

    def events(self, rows: np.ndarray) -> list[Event]:
        """The rows decoded, exactly as the recorder's decoder would."""
        ...

    def fields(self, rows: np.ndarray) -> EventFields:
        """What events() would hold, as arrays."""
        ...

    def take(self, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """A compact copy of rows[idx] (what the analysis keeps of an open connection)."""
        ...

    def concat(self, parts: list[np.ndarray]) -> np.ndarray: ...


# What the streaming analysis keeps per event besides its raw record, computed once:
# time, position in the recording, the packet's tuple and (where has_ct) the conntrack
# entry's original and reply tuples as TupleIds integers, netns, TCP sequence number,
# TCP flags, has_ct, whether that entry was confirmed (cf), whether it is a drop or an
# ICMP error (special: its connection is never judged from its columns alone).
DERIVED = np.dtype(
    [("ts", "<u8"), ("arrival", "<i8"), ("t", "<u8"), ("o", "<u8"), ("r", "<u8"),
     ("netns", "<u4"), ("seq", "<u4"), ("flags", "u1"), ("ct", "?"), ("cf", "?"),
     ("special", "?")]
)  # fmt: skip
_DERIVED_OPAQUE = np.dtype(f"V{DERIVED.itemsize}")


def take_derived(d: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """d[idx] (as opaque items: much faster than field by field)."""
    return d.view(_DERIVED_OPAQUE)[idx].view(DERIVED)


def concat_derived(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate(parts), without promoting the structured dtype once per part."""
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p.view(_DERIVED_OPAQUE) for p in parts]).view(DERIVED)


def derive(cols: EventColumns, first: int, ids: TupleIds) -> np.ndarray:
    """The DERIVED entries of a batch's events (its first is the recording's `first`)."""
    d = np.empty(len(cols), dtype=DERIVED)
    d["ts"] = cols.ts
    d["arrival"] = np.arange(first, first + len(cols))
    d["netns"] = cols.netns
    d["flags"] = cols.flags
    d["seq"] = cols.seq
    d["t"] = ids.pack(cols.saddr, cols.daddr, cols.ports, cols.udp)
    ct = cols.has_ct
    d["ct"] = ct
    d["o"] = 0
    d["r"] = 0
    d["cf"] = False
    d["special"] = cols.special if cols.special is not None else False
    if len(cols.o_saddr):
        if cols.confirmed is not None:
            d["cf"][ct] = cols.confirmed
        udp = cols.udp[ct] if cols.udp is not None else None  # an entry is of its flow
        d["o"][ct] = ids.pack(cols.o_saddr, cols.o_daddr, cols.o_ports, udp)
        d["r"][ct] = ids.pack(cols.r_saddr, cols.r_daddr, cols.r_ports, udp)
    return d


# Raw rows of some events: (rows, index into them), or (rows, None) for all of them. The
# analysis keeps references into a batch for connections it finishes within that batch,
# and copies (RecordCodec.take) only for those that stay open.
RowsRef = tuple[np.ndarray, "np.ndarray | None"]


def rows_from(codec: RecordCodec, refs: list[RowsRef]) -> np.ndarray:
    """The rows of refs, in order, as one array."""
    parts = [src if idx is None else codec.take(src, idx) for src, idx in refs]
    return codec.concat(parts)


class TupleIds:
    """4-tuples as uint64 (address ids and ports), the form the streaming analysis groups by.

    Each distinct address gets a 15-bit id the first time it is seen (a node sees a few
    hundred: its pods, the Service, the backends); a tuple is src<<48 | dst<<32 |
    sport<<16 | dport, where src and dst are the ids with bit 15 set for UDP (so a UDP
    tuple never equals a TCP one, and reversing keeps the protocol): equal tuples are
    equal integers and reversing is arithmetic. ADDR_MASK takes an id out of src or dst.
    """

    MAX_ADDRESSES = 1 << 15
    ADDR_MASK = 0x7FFF
    UDP = (0x8000 << 48) | (0x8000 << 32)

    def __init__(
        self, service_ip: str, prefix: int = 32, addresses: frozenset[str] | None = None
    ) -> None:
        self._ids: dict[int, int] = {}
        self._names: list[str] = []
        # direct-mapped by the low 16 bits: slot -> id + 1 (0: empty), and id + 1 -> address
        self._slot = np.zeros(1 << 16, dtype=np.uint64)
        self._addr = np.zeros(1, dtype=np.uint32)
        # id -> whether that address is a traced Service's (service_ip/prefix)
        self._in_service = np.zeros(0, dtype=bool)
        self._service_ids: set[int] = set()
        svc = _addr(service_ip)
        self.service_addr = svc  # None: not a dotted quad, so no event can match it
        self._mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if 0 < prefix < 32 else 0xFFFFFFFF
        self._net = svc & self._mask if svc is not None else None
        # of a range, the addresses that are Services; None: every address in it
        self._only = addresses if self._mask != 0xFFFFFFFF else None
        # the one Service address's id (a range: None, see in_service)
        sid = self._add(svc) if svc is not None else None
        self.service_id = sid if self._mask == 0xFFFFFFFF else None
        self.has_service = svc is not None  # False: no event can be the Service's

    def in_service(self, ids: np.ndarray) -> np.ndarray:
        """Whether each address id (bit 15, UDP, cleared) is a traced Service address."""
        return self._in_service[ids]

    def is_service_id(self, addr_id: int) -> bool:
        """Whether the address of addr_id (bit 15, UDP, cleared) is a traced Service's."""
        return addr_id in self._service_ids

    def _add(self, addr: int) -> int:
        if len(self._names) >= self.MAX_ADDRESSES:
            raise HairtraceError(
                f"more than {self.MAX_ADDRESSES} distinct addresses: too many for the "
                "streaming analysis (replay with --no-stream)"
            )
        new = self._ids[addr] = len(self._names)
        self._names.append(socket.inet_ntoa(addr.to_bytes(4, "big")))
        self._addr = np.append(self._addr, np.uint32(addr))
        mine = self._net is not None and addr & self._mask == self._net
        if mine and self._only is not None:
            mine = self._names[new] in self._only
        self._in_service = np.append(self._in_service, mine)
        if mine:
            self._service_ids.add(new)
        if not self._slot[addr & 0xFFFF]:
            self._slot[addr & 0xFFFF] = new + 1
        return new

    def ids(self, addrs: np.ndarray) -> np.ndarray:
        """The id of every address (new ones are added), as uint64."""
        got = self._slot[addrs & 0xFFFF]
        miss = (got == 0) | (self._addr[got] != addrs)
        if miss.any():  # new addresses, or one sharing its low 16 bits with another
            uniq, inv = np.unique(addrs[miss], return_inverse=True)
            ids = self._ids
            fixed = [ids[a] if a in ids else self._add(a) for a in uniq.tolist()]
            got = got.copy()
            got[miss] = np.array(fixed, dtype=np.uint64)[inv] + np.uint64(1)
        return got - np.uint64(1)

    def pack(
        self,
        saddr: np.ndarray,
        daddr: np.ndarray,
        ports: np.ndarray,
        udp: np.ndarray | None = None,
    ) -> np.ndarray:
        out = self.ids(saddr) << np.uint64(48)
        out |= self.ids(daddr) << np.uint64(32)
        out |= ports
        if udp is not None:
            out |= udp.astype(np.uint64) * np.uint64(self.UDP)
        return out

    @staticmethod
    def is_udp(t: int) -> bool:
        return bool(t >> 63)

    @staticmethod
    def reverse(t: Any) -> Any:
        """The reversed tuple(s) of t (an int or a uint64 array)."""
        if isinstance(t, np.ndarray):
            m16 = np.uint64(0xFFFF)
            s, d = (t >> np.uint64(48)) & m16, (t >> np.uint64(32)) & m16
            sp, dp = (t >> np.uint64(16)) & m16, t & m16
            return (d << np.uint64(48)) | (s << np.uint64(32)) | (dp << np.uint64(16)) | sp
        s, d, sp, dp = t >> 48, (t >> 32) & 0xFFFF, (t >> 16) & 0xFFFF, t & 0xFFFF
        return (d << 48) | (s << 32) | (dp << 16) | sp

    def name(self, addr_id: int) -> str:
        """The address of an id (bit 15, UDP, ignored)."""
        return self._names[addr_id & 0x7FFF]

    def tuple(self, t: int) -> Tuple:
        names, m = self._names, self.ADDR_MASK
        return Tuple(names[(t >> 48) & m], (t >> 16) & 0xFFFF, names[(t >> 32) & m], t & 0xFFFF)


def _addr(ip: str) -> int | None:
    """A canonical dotted quad as an int; None for anything else (never equal to an
    event's address, whose text is always canonical)."""
    try:
        raw = socket.inet_aton(ip)
    except OSError:
        return None
    return int.from_bytes(raw, "big") if socket.inet_ntoa(raw) == ip else None
