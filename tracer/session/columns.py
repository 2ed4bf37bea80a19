"""The event table of an export: one row per event, typed columns, names resolved.

COLUMNS is the contract of `hairtrace export` and tracer.session.load_events:
names are only ever added. Missing values are null (an empty CSV field).
Read an export back with its types: pd.read_csv(path, dtype=pandas_dtypes()).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tracer.analysis.context import Context
from tracer.analysis.model import CTINFO_NAMES, NF_HOOKS, Event
from tracer.analysis.reassemble import role_of
from tracer.session.connindex import ConnIndex


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
    Column("proto", "uint8", "uint8", "IP protocol number"),
    Column("tcp_flags", "category", "dict", 'TCP flags as text, e.g. "SYN|ACK" ("none")'),
    Column("seq", "uint32", "uint32", "TCP sequence number"),
    Column("ack", "uint32", "uint32", "TCP acknowledgment number"),
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
    Column("role", "category", "dict", "packet role from the flags: SYN, SYN+ACK, ACK, ..."),
    Column("direction", "category", "dict", "original or reply (within its connection)"),
    Column("location", "category", "dict",
           'function that freed a dropped skb, "name+0xoff" where the recording named it, '
           "else its per-trace id (hex); null when none"),
)  # fmt: skip
NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")


def pandas_dtypes() -> dict[str, str]:
    """Column -> pandas dtype, e.g. for pd.read_csv(path, dtype=pandas_dtypes())."""
    return {c.name: c.dtype for c in COLUMNS}


def flags_text(flags: int) -> str:
    return "|".join(n for i, n in enumerate(_FLAG_NAMES) if flags >> i & 1) or "none"


def _row(
    ev: Event, ctx: Context, start_ns: int, conns: ConnIndex, locations: Mapping[int, str]
) -> tuple[Any, ...]:
    info, ct, t = ev.info, ev.ct, ev.tuple
    conn, direction = conns.lookup(ev)
    drop = ctx.drop_reasons.get(ev.reason, f"reason-{ev.reason}") if info.kind == "drop" else None
    return (
        (ev.ts_ns - start_ns) / 1e9,
        ev.ts_ns,
        info.name,
        info.kind,
        ev.netns,
        ctx.names.ns_name(ev.netns),
        ev.dev or None,
        ev.ifindex,
        t.src,
        t.sport,
        t.dst,
        t.dport,
        ev.proto,
        flags_text(ev.tcp_flags),
        ev.seq,
        ev.ack_seq,
        ev.ip_id,
        NF_HOOKS.get(ev.hook),
        f"{ev.skb:#x}",
        f"{ct.id:#x}" if ct else None,
        CTINFO_NAMES.get(ct.ctinfo, str(ct.ctinfo)) if ct else None,
        "|".join(ct.status_names) or "none" if ct else None,
        str(ct.orig) if ct else None,
        str(ct.reply) if ct else None,
        drop,
        ev.aux,
        conn,
        role_of(ev.tcp_flags),
        direction,
        locations.get(ev.location, f"{ev.location:#x}") if ev.location else None,
    )


def rows(
    events: Sequence[Event],
    ctx: Context,
    start_ns: int,
    conns: ConnIndex,
    locations: Mapping[int, str] | None = None,
) -> list[tuple[Any, ...]]:
    """One tuple per event, in COLUMNS order (locations: the footer's id -> function)."""
    names = locations or {}
    return [_row(ev, ctx, start_ns, conns, names) for ev in events]


def columnar(row_list: Sequence[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """Rows -> column name -> values."""
    if not row_list:
        return {name: [] for name in NAMES}
    return {name: list(values) for name, values in zip(NAMES, zip(*row_list), strict=True)}
