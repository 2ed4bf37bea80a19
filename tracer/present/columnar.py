"""A connection's entry in the JSON report, written straight from its events' columns.

In the report of a long session every event is a hop, so writing the report is
most of a replay's work. Building Event, Packet and Hop objects for each event
and then dicts costs tens of microseconds an event; this writes the entry of a
connection the streaming analysis kept as raw rows (LazyConnection) from the
arrays of its events, with the strings of names, endpoints and conntrack entries
made once, character for character what

    dumps_indented(connection_dict(conn, diag, origin_ns))

writes. It follows tracer.analysis.reassemble (packets: same segment, a new one
when it passes a place again; directions; NAT changes; which packet an RST
answers) and tracer.present.report (the keys, their order, drop reasons);
tests/present/test_columnar.py checks the text on every recorded connection.
"""

from __future__ import annotations

import socket
from json.encoder import encode_basestring_ascii as _enc
from typing import Any

import numpy as np

from tracer.analysis.context import Context
from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.finalize import LazyConnection
from tracer.analysis.reassemble import role_of
from tracer.events.model import CTINFO_NAMES, Conntrack, Tuple, point_info
from tracer.events.rows import EventFields
from tracer.present.jsontext import dumps_indented
from tracer.present.report import connection_dict

_PACKETS = "\0packets\0"  # stands for the packets in the rest of the entry
_M = np.uint64(16)


class ColumnarWriter:
    """Writes report entries of LazyConnections; keeps the strings it made (names,
    endpoints, conntrack entries, NAT changes) for the next connections."""

    def __init__(self) -> None:
        self._reset(None)

    def _reset(self, ctx: Context | None) -> None:
        self._ctx = ctx  # the strings below name things as this Context does
        # kept for the whole report (a node has few): points, namespaces, devices, reasons
        self._heads: dict[tuple[str, int, int, bytes], tuple[str, Any, bool]] = {}
        self._names_text: dict[str, str] = {}
        # kept for one connection (its ports are its own): JSON text of endpoints, ct
        # entries and NAT changes, by endpoint / ct tuple / (previous tuple, src, dst)
        self._text: dict[Any, str] = {}
        self._plain: dict[int, str] = {}

    def entry(
        self, conn: LazyConnection, diag: Diagnosis, origin_ns: int, nl: str, names: Any = None
    ) -> str:
        """The connection's entry in the report, starting at the current position of a
        line whose break and indentation is nl (as dumps_indented would continue it);
        names: RunInfo.service_names."""
        if conn.context is not self._ctx:
            self._reset(conn.context)
        self._text, self._plain = {}, {}
        rest = dumps_indented(connection_dict(conn, diag, origin_ns, packets=_PACKETS, names=names))
        rest = rest.replace("\n", nl)
        at = rest.index(_enc(_PACKETS))
        packets = self._packets(conn.key, conn.fields(), origin_ns, nl + "  ")
        return rest[:at] + packets + rest[at + len(_enc(_PACKETS)) :]

    # ------------------------------------------------------------------ strings

    def _endpoint(self, ep: int) -> str:
        """'ip:port' of an endpoint int (address << 16 | port)."""
        s = self._plain.get(ep)
        if s is None:
            ip = socket.inet_ntoa((ep >> 16).to_bytes(4, "big"))
            s = self._plain[ep] = f"{ip}:{ep & 0xFFFF}"
        return s

    def _json_endpoint(self, ep: int) -> str:
        s = self._text[ep] = _enc(self._endpoint(ep))
        return s

    def _head(self, nl: str, point: int, netns: int, raw: bytes) -> tuple[str, Any, bool]:
        """A hop's text up to its "src" value (at line break nl), its place (what makes a
        second passage a retransmission), whether the point is a drop."""
        assert self._ctx is not None
        info = point_info(point)
        dev = raw.split(b"\0", 1)[0].decode(errors="replace")  # as Event.dev
        pod, dev_pod = self._ctx.names.pod_of(netns), self._ctx.names.pod_behind(netns, dev)
        text = (
            "{" + nl + '"netns": ' + _enc(self._ctx.names.ns_name(netns)) + ","
            + nl + '"pod": ' + ("null" if pod is None else _enc(pod)) + ","
            + nl + '"dev": ' + _enc(dev) + ","
            + nl + '"dev_pod": ' + ("null" if dev_pod is None else _enc(dev_pod)) + ","
            + nl + '"point": ' + _enc(info.name) + ","
            + nl + '"src": '
        )  # fmt: skip
        got = self._heads[(nl, point, netns, raw)] = (
            text,
            (netns, dev, point),
            info.kind == "drop",
        )
        return got

    def _json(self, s: str) -> str:
        """JSON text of a drop reason."""
        t = self._names_text.get(s)
        if t is None:
            t = self._names_text[s] = _enc(s)
        return t

    def _ct(self, ct: tuple[int, ...], nl: str) -> str:
        """The hop's "ct" value: Conntrack.to_dict() as JSON text at line break nl."""
        cid, status, ctinfo, osrc, odst, rsrc, rdst = ct
        names = Conntrack(cid, status, ctinfo, _T, _T).status_names
        inner = nl + "  "
        status_text = (
            "[" + inner + "  " + ("," + inner + "  ").join(map(_enc, names)) + inner + "]"
            if names
            else "[]"
        )
        s = self._text[ct] = (
            "{" + inner + f'"id": "{cid:#x}",' + inner
            + '"state": ' + _enc(CTINFO_NAMES.get(ctinfo, str(ctinfo))) + "," + inner
            + '"status": ' + status_text + "," + inner
            + '"original": ' + self._tuple(osrc, odst) + "," + inner
            + '"reply": ' + self._tuple(rsrc, rdst) + nl + "}"
        )  # fmt: skip
        return s

    def _tuple(self, src: int, dst: int) -> str:
        return _enc(f"{self._endpoint(src)} -> {self._endpoint(dst)}")

    def _nat(self, prev: tuple[int, int], src: int, dst: int) -> str:
        """reassemble._nat_change(prev, (src, dst)) as JSON text."""
        parts = []
        if prev[1] != dst:
            parts.append(f"DNAT {self._endpoint(prev[1])} -> {self._endpoint(dst)}")
        if prev[0] != src:
            parts.append(f"SNAT {self._endpoint(prev[0])} -> {self._endpoint(src)}")
        s = self._text[(prev, src, dst)] = _enc("; ".join(parts)) if parts else "null"
        return s

    # ------------------------------------------------------------------ packets

    def _packets(self, key: Tuple, f: EventFields, origin_ns: int, nl: str) -> str:
        """The "packets" list (reassemble._packets, report._packet) at line break nl."""
        assert self._ctx is not None
        drop_reasons = self._ctx.drop_reasons
        nl_pkt, nl_pkey = nl + "  ", nl + "    "
        nl_hop, nl_hkey = nl_pkey + "  ", nl_pkey + "    "
        nl_ct = nl_hkey
        src = ((f.saddr.astype(np.uint64) << _M) | f.sport).tolist()
        dst = ((f.daddr.astype(np.uint64) << _M) | f.dport).tolist()
        cts: list[tuple[int, ...] | None] = [None] * len(src)
        reply_side = {(_ep(key.dst, key.dport), _ep(key.src, key.sport))}
        at = np.flatnonzero(f.has_ct)
        if len(at):
            osrc = ((f.o_saddr[at].astype(np.uint64) << _M) | f.o_sport[at]).tolist()
            odst = ((f.o_daddr[at].astype(np.uint64) << _M) | f.o_dport[at]).tolist()
            rsrc = ((f.r_saddr[at].astype(np.uint64) << _M) | f.r_sport[at]).tolist()
            rdst = ((f.r_daddr[at].astype(np.uint64) << _M) | f.r_dport[at]).tolist()
            for i, *ct in zip(
                at.tolist(), f.ct_id[at].tolist(), f.ct_status[at].tolist(),
                f.ctinfo[at].tolist(), osrc, odst, rsrc, rdst, strict=True,
            ):  # fmt: skip
                cts[i] = tuple(ct)
                reply_side.add((ct[5], ct[6]))
        k_dst, k_ct = "," + nl_hkey + '"dst": ', "," + nl_hkey + '"ct": '
        k_nat, k_drop = "," + nl_hkey + '"nat": ', "," + nl_hkey + '"drop_reason": '
        close_hop = nl_hop + "}"
        heads, endpoints = self._heads, self._text
        packets: list[list[Any]] = []
        open_by_id: dict[tuple[int, int, int, int], list[Any]] = {}
        for ts, point, netns, raw, s, d, flags, seq, ack, ip_id, reason, ct in zip(
            f.ts.tolist(), f.point.tolist(), f.netns.tolist(), f.dev.tolist(), src, dst,
            f.flags.tolist(), f.seq.tolist(), f.ack.tolist(), f.ip_id.tolist(),
            f.reason.tolist(), cts, strict=True,
        ):  # fmt: skip
            ident = (flags, seq, ack, ip_id)
            pkt = open_by_id.get(ident)
            head = heads.get((nl_hkey, point, netns, raw)) or self._head(nl_hkey, point, netns, raw)
            place = head[1]
            if pkt is not None and place in pkt[6]:
                pkt = None
            if pkt is None:
                direction = "reply" if (s, d) in reply_side else "original"
                # role, direction, flags, seq, ack, first ts, places, hops, last tuple
                pkt = [role_of(flags), direction, flags, seq, ack, ts, set(), [], None]
                packets.append(pkt)
                open_by_id[ident] = pkt
            pkt[6].add(place)
            prev = pkt[8]
            hop = (
                head[0]
                + (endpoints.get(s) or self._json_endpoint(s)) + k_dst
                + (endpoints.get(d) or self._json_endpoint(d)) + k_ct
                + ((endpoints.get(ct) or self._ct(ct, nl_ct)) if ct is not None else "null")
                + k_nat
                + ((endpoints.get((prev, s, d)) or self._nat(prev, s, d)) if prev else "null")
            )  # fmt: skip
            if head[2]:  # a drop
                why = drop_reasons.get(reason, f"reason-{reason}")
                if why:
                    hop += k_drop + self._json(why)
            pkt[7].append(hop + close_hop)
            pkt[8] = (s, d)
        return _packets_text(packets, origin_ns, nl, nl_pkt, nl_pkey, nl_hop)


def _packets_text(
    packets: list[list[Any]], origin_ns: int, nl: str, nl_pkt: str, nl_pkey: str, nl_hop: str
) -> str:
    out = []
    for i, (role, direction, flags, seq, ack, ts, _places, hops, _last) in enumerate(packets):
        text = (
            "{" + nl_pkey + '"role": ' + _enc(role) + "," + nl_pkey
            + '"direction": ' + _enc(direction) + "," + nl_pkey
            + '"ts": ' + float.__repr__(round((ts - origin_ns) / 1e9, 6)) + "," + nl_pkey
            + '"seq": ' + str(seq) + "," + nl_pkey + '"ack": ' + str(ack) + "," + nl_pkey
            + '"hops": [' + nl_hop + ("," + nl_hop).join(hops) + nl_pkey + "]"
        )  # fmt: skip
        if role == "RST":  # reassemble._link_resets
            for j in range(i - 1, -1, -1):
                cand = packets[j]
                if cand[1] != direction and cand[4] == seq and cand[2] & 0x10:
                    text += "," + nl_pkey + f'"caused_by": {j}'
                    break
        out.append(text + nl_pkt + "}")
    return "[" + nl_pkt + ("," + nl_pkt).join(out) + nl + "]"


def _ep(ip: str, port: int) -> int:
    return int.from_bytes(socket.inet_aton(ip), "big") << 16 | port


_T = Tuple("0.0.0.0", 0, "0.0.0.0", 0)  # placeholder: only status_names is read
