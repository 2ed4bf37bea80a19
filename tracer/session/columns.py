"""The event table of an export: one row per event, typed columns, names resolved.

COLUMNS is the contract of `hairtrace export` and tracer.session.load_events:
names are only ever added. Missing values are null (an empty CSV field).
Read an export back with its types: pd.read_csv(path, dtype=pandas_dtypes()).

event_columns() builds the columns of a batch of raw records at once (numpy rows,
tracer.events.rows), with the values a per-event decoding gives: each distinct value
(an address, a point, a conntrack tuple) is named once per batch, and the names
spread back to the rows through dictionary-encoded Arrow arrays; record_batch()
makes them a table of arrow_schema(). pandas and pyarrow are imported on first use.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from tracer.analysis.context import Context
from tracer.analysis.reassemble import role_of
from tracer.events.codec import EVENT_DTYPE
from tracer.events.model import (
    CTINFO_NAMES,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    NF_HOOKS,
    POINTS,
    Conntrack,
    Tuple,
    point_info,
)
from tracer.events.rows import CODEC, EventFields


@dataclass(frozen=True)
class Column:
    """One column: its pandas dtype, Arrow type name (parquet) and meaning."""

    name: str
    dtype: str  # pandas
    arrow: str  # a pyarrow type factory name; "dict" = dictionary<int32, string>
    doc: str


COLUMNS: tuple[Column, ...] = (
    Column("ts", "float64", "float64", "seconds since the trace started (header start_ns)"),
    Column("ts_ns", "uint64", "uint64", "CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns)"),
    Column("point", "category", "dict", "probe point, e.g. net_dev_start_xmit"),
    Column("kind", "category", "dict", "provider-neutral point kind (dev_rx, nat, ...)"),
    Column("netns", "uint32", "uint32", "network namespace inode"),
    Column("netns_name", "category", "dict", "its name in the topology snapshot"),
    Column("dev", "category", "dict", "device name, null when the point has none"),
    Column("ifindex", "uint32", "uint32", "device index in that namespace"),
    Column("src", "category", "dict", "source address at this point"),
    Column("sport", "uint16", "uint16", "source port"),
    Column("dst", "category", "dict", "destination address at this point"),
    Column("dport", "uint16", "uint16", "destination port"),
    Column("proto", "uint8", "uint8", "IP protocol number (1: an ICMP error; then src, sport, "
           "dst, dport are those of the packet it quotes)"),
    Column("tcp_flags", "category", "dict", 'TCP flags as text, e.g. "SYN|ACK" ("none")'),
    Column("seq", "uint32", "uint32", "TCP sequence number; UDP: datagram length; ICMP "
           "error: its own source address as an integer"),
    Column("ack", "uint32", "uint32", "TCP acknowledgment number; ICMP error: its own "
           "destination address as an integer"),
    Column("ip_id", "uint16", "uint16", "IP identification"),
    Column("hook", "category", "dict", "netfilter hook of the point, null when none"),
    Column("skb", "str", "string", "per-trace id of the skb (hex): one packet along a hop chain"),
    Column("ct_id", "str", "string", "per-trace id of the conntrack entry (hex), null when none"),
    Column("ct_state", "category", "dict", "ip_conntrack_info name, e.g. NEW"),
    Column("ct_status", "category", "dict", "conntrack status bit names joined by |, or none"),
    Column("ct_original", "str", "string", 'conntrack original tuple "a:p -> b:q"'),
    Column("ct_reply", "str", "string", "conntrack reply tuple"),
    Column("drop_reason", "category", "dict", "kfree_skb reason name (drop points only)"),
    Column("aux", "uint32", "uint32", "point-specific value (NAT manip, conntrack verdict)"),
    Column("conn", "Int64", "int64", "index of the connection in the JSON report, null if none"),
    Column("role", "category", "dict",
           "packet role from the flags: SYN, SYN+ACK, ACK, ...; UDP; ICMP"),
    Column("direction", "category", "dict", "original or reply (within its connection)"),
    Column("location", "category", "dict",
           'function that freed a dropped skb, "name+0xoff" where the recording named it, '
           "else its per-trace id (hex); null when none"),
    Column("inner_proto", "uint8", "uint8", "ICMP error: the quoted packet's protocol; else 0"),
    Column("icmp_type", "uint8", "uint8", "ICMP error: its type (3 destination unreachable, "
           "11 time exceeded, 12 parameter problem); else 0"),
    Column("icmp_code", "uint8", "uint8", "ICMP error: its code (3 port unreachable, ...)"),
    # appended (columns are only ever added at the end)
    Column("pod", "category", "dict", 'the pod that namespace is ("namespace/name"), null '
           "when none or unknown"),
)  # fmt: skip
NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
DIRECTIONS = ("original", "reply")  # the direction column's values, by code 0 and 1
NO_CONN = -1  # conn / direction code of an event in no connection
_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
_DROP_POINTS = np.array(sorted(p for p, info in POINTS.items() if info.kind == "drop"))


def pandas_dtypes() -> dict[str, str]:
    """Column -> pandas dtype, e.g. for pd.read_csv(path, dtype=pandas_dtypes())."""
    return {c.name: c.dtype for c in COLUMNS}


@cache
def arrow_schema() -> Any:
    """The pyarrow schema of COLUMNS, with pandas metadata so pd.read_parquet restores dtypes
    (built once: every batch is checked against it)."""
    import pandas as pd
    import pyarrow as pa

    def arrow_type(name: str) -> Any:
        return pa.dictionary(pa.int32(), pa.string()) if name == "dict" else getattr(pa, name)()

    empty = pd.DataFrame({c.name: pd.Series([], dtype=c.dtype) for c in COLUMNS})
    meta = pa.Schema.from_pandas(empty, preserve_index=False).metadata
    return pa.schema([(c.name, arrow_type(c.arrow)) for c in COLUMNS]).with_metadata(meta)


# ------------------------------------------------------------------ value names


def flags_text(flags: int) -> str:
    return "|".join(n for i, n in enumerate(_FLAG_NAMES) if flags >> i & 1) or "none"


def ip_text(addr: int) -> str:
    """An IPv4 address held as a host-order int (a.b.c.d = a<<24|...), dotted."""
    return socket.inet_ntoa(addr.to_bytes(4, "big"))


_ANY = Tuple("0.0.0.0", 0, "0.0.0.0", 0)


def status_text(status: int) -> str:
    """A conntrack status as its bit names joined by |, "none" without any: the names
    Conntrack gives (one list of bits for reports and exports)."""
    return "|".join(Conntrack(0, status, 0, _ANY, _ANY).status_names) or "none"


def dev_text(raw: bytes) -> str | None:
    """A device name field (NUL-padded) as the decoder reads it; None when empty."""
    return raw.split(b"\0", 1)[0].decode(errors="replace") or None


@dataclass(frozen=True)
class Naming:
    """What names the values of a recording: its topology and drop reasons (ctx), its
    start (ts is relative to it) and the footer's drop location id -> function."""

    ctx: Context
    start_ns: int
    locations: Mapping[int, str]


# ------------------------------------------------------------------ the columns


def event_columns(
    rows: np.ndarray, conn: np.ndarray, direction: np.ndarray, names: Naming
) -> list[Any]:
    """The columns (pyarrow arrays, COLUMNS order) of rows (tracer.events.rows.rows_of):
    conn and direction are the rows' entries of the connection pass (int64 index in the
    report and int8 DIRECTIONS code, NO_CONN for none). The "str" columns come
    dictionary-encoded, as they are built, so that a text writer formats each distinct
    value once; record_batch() makes the table of the contract."""
    import pyarrow as pa

    rec, f = rows.view(EVENT_DTYPE), CODEC.fields(rows)
    cols = {
        **_packet_columns(rec, f, names),
        **_conntrack_columns(f),
        **_drop_columns(rec, f, names),
        "conn": pa.array(conn, type=pa.int64(), mask=_nulls(conn < 0)),
        "direction": _category(_Distinct([direction], direction >= 0), DIRECTIONS.__getitem__),
    }
    return [cols[name] for name in NAMES]


def record_batch(columns: Sequence[Any]) -> Any:
    """event_columns() as a pyarrow RecordBatch of arrow_schema() (the "str" columns
    decoded to plain strings)."""
    import pyarrow as pa

    schema = arrow_schema()
    arrays = [
        c.dictionary.take(c.indices) if pa.types.is_string(f.type) else c
        for f, c in zip(schema, columns, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _packet_columns(rec: np.ndarray, f: EventFields, names: Naming) -> dict[str, Any]:
    """Where and what the packet was: time, point, namespace, device, addresses, TCP."""
    import pyarrow as pa

    ts = (f.ts.astype(np.int64) - np.int64(names.start_ns)) / 1e9
    point, flags = _Distinct([f.point]), _Distinct([f.flags])
    return {
        "ts": pa.array(ts, type=pa.float64()),
        "ts_ns": _uint(f.ts, np.uint64),
        "point": _category(point, lambda p: point_info(p).name),
        "kind": _category(point, lambda p: point_info(p).kind),
        "netns": _uint(f.netns, np.uint32),
        "netns_name": _category(_Distinct([f.netns]), names.ctx.names.ns_name),
        "pod": _category(_Distinct([f.netns]), names.ctx.names.pod_of),
        "dev": _dev(f.dev),
        "ifindex": _uint(rec["ifindex"], np.uint32),
        "src": _category(_Distinct([f.saddr]), ip_text),
        "sport": _uint(f.sport, np.uint16),
        "dst": _category(_Distinct([f.daddr]), ip_text),
        "dport": _uint(f.dport, np.uint16),
        "proto": _uint(rec["proto"], np.uint8),
        "tcp_flags": _category(flags, flags_text),
        "seq": _uint(f.seq, np.uint32),
        "ack": _uint(f.ack, np.uint32),
        "ip_id": _uint(f.ip_id, np.uint16),
        "hook": _category(_Distinct([rec["hook"]]), NF_HOOKS.get),
        "skb": _category(_Distinct([rec["skb"]]), _hex),
        "role": _category(_Distinct([rec["proto"], f.flags]), _role),
        "inner_proto": _uint(rec["inner_proto"], np.uint8),
        "icmp_type": _uint(rec["icmp_type"], np.uint8),
        "icmp_code": _uint(rec["icmp_code"], np.uint8),
    }


def _role(proto: int, flags: int) -> str:
    return {IPPROTO_UDP: "UDP", IPPROTO_ICMP: "ICMP"}.get(proto) or role_of(flags)


def _conntrack_columns(f: EventFields) -> dict[str, Any]:
    """The conntrack entry the packet carried (null for the events without one)."""
    ct = f.has_ct
    orig = (f.o_saddr, f.o_daddr, f.o_sport, f.o_dport)
    reply = (f.r_saddr, f.r_daddr, f.r_sport, f.r_dport)
    return {
        "ct_id": _category(_Distinct([f.ct_id], ct), _hex),
        "ct_state": _category(_Distinct([f.ctinfo], ct), lambda c: CTINFO_NAMES.get(c, str(c))),
        "ct_status": _category(_Distinct([f.ct_status], ct), status_text),
        "ct_original": _tuples(orig, ct),
        "ct_reply": _tuples(reply, ct),
    }


def _drop_columns(rec: np.ndarray, f: EventFields, names: Naming) -> dict[str, Any]:
    """Why and where a dropped packet was freed, and the point's own value."""
    reasons, places, location = names.ctx.drop_reasons, names.locations, rec["location"]
    return {
        "drop_reason": _category(
            _Distinct([f.reason], np.isin(f.point, _DROP_POINTS)),
            lambda r: reasons.get(r, f"reason-{r}"),
        ),
        "aux": _uint(rec["aux"], np.uint32),
        "location": _category(
            _Distinct([location], location != 0), lambda x: places.get(x, f"{x:#x}")
        ),
    }


def _hex(value: int) -> str:
    return f"{value:#x}"


def _dev(dev: np.ndarray) -> Any:
    """Device names (16 NUL-padded bytes each), told apart as two u64 halves."""
    halves = np.ascontiguousarray(dev).view(np.uint64).reshape(-1, 2)
    keys = _Distinct([halves[:, 0], halves[:, 1]])

    def name(low: int, high: int) -> str | None:
        return dev_text(low.to_bytes(8, sys.byteorder) + high.to_bytes(8, sys.byteorder))

    return _category(keys, name)


def _tuples(parts: tuple[np.ndarray, ...], valid: np.ndarray) -> Any:
    """Conntrack tuples as "a:p -> b:q" text where valid (each distinct one named once),
    told apart as the two addresses and the two ports in one integer each."""
    saddr, daddr, sport, dport = parts
    hosts = saddr.astype(np.uint64) << np.uint64(32) | daddr
    ports = sport.astype(np.uint32) << np.uint32(16) | dport

    def text(hosts: int, ports: int) -> str:
        src, dst = ip_text(hosts >> 32), ip_text(hosts & 0xFFFFFFFF)
        return str(Tuple(src, ports >> 16, dst, ports & 0xFFFF))

    return _category(_Distinct([hosts, ports], valid), text)


# ------------------------------------------------------------------ arrays


def _uint(values: np.ndarray, dtype: type[np.unsignedinteger[Any]]) -> Any:
    """A numeric column, in host order and contiguous (what Arrow takes without copying)."""
    import pyarrow as pa

    return pa.array(np.ascontiguousarray(values, dtype=dtype))


def _nulls(mask: np.ndarray) -> np.ndarray | None:
    return mask if mask.any() else None


class _Distinct:
    """The distinct rows of some key columns of a batch (only the valid rows; the others
    are null): codes[i] is the row's (0, 1, ... in order of first appearance, as the
    dictionaries of a per-row export had them), values[k][code] its k-th key. Found by
    hashing (pandas.factorize), several keys combined pairwise, so each distinct value
    is named once per batch whatever the number of rows."""

    def __init__(self, keys: Sequence[np.ndarray], valid: np.ndarray | None = None) -> None:
        import pandas as pd

        self.rows = len(keys[0])
        self.sel = np.flatnonzero(valid) if valid is not None and not valid.all() else None
        if self.sel is not None:
            keys = [k[self.sel] for k in keys]
        codes, first = pd.factorize(keys[0])
        values = [first]
        for key in keys[1:]:
            more, uniq = pd.factorize(key)
            codes, pairs = pd.factorize(codes * len(uniq) + more)
            values = [v[pairs // len(uniq)] for v in values] + [uniq[pairs % len(uniq)]]
        self.codes: np.ndarray = codes
        self.values: list[np.ndarray] = values


def _category(keys: _Distinct, label: Callable[..., str | None]) -> Any:
    """A dictionary<int32, string> column: label(*key values) names each distinct key;
    rows not valid, and labels None, are null."""
    import pyarrow as pa

    names: dict[str, int] = {}  # distinct labels: two keys may have the same
    labels = (label(*key) for key in zip(*(v.tolist() for v in keys.values), strict=True))
    remap = np.array([-1 if s is None else names.setdefault(s, len(names)) for s in labels],
                     dtype=np.int32)  # fmt: skip
    index = remap[keys.codes]
    if keys.sel is not None:
        spread = np.full(keys.rows, -1, dtype=np.int32)
        spread[keys.sel] = index
        index = spread
    indices = pa.array(index, type=pa.int32(), mask=_nulls(index < 0))
    return pa.DictionaryArray.from_arrays(indices, pa.array(list(names), type=pa.string()))
