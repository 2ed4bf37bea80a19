"""Large synthetic sessions for measuring replay: recorded sessions repeated over time.

Each copy of a source session gets its own client ports and is shifted in time,
so the result holds many distinct connections one after another, as a long
recording of a busy node would. Only timestamps and client ports change; every
other byte of every record is the recorded one, so each copy reassembles and
is diagnosed exactly as its source.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tracer.errors import HairtraceError
from tracer.events.codec import LAYOUT
from tracer.session.reader import open_session
from tracer.session.writer import SessionWriter

# Where the TCP ports of the packet and of the conntrack tuples sit in a record
# (each 12-byte tuple is saddr, daddr, sport, dport in network byte order).
_PORT_OFFSETS = tuple(
    LAYOUT[name][0] + delta for name in ("pkt", "ct_orig", "ct_reply") for delta in (8, 10)
)
_FIRST_PORT, _LAST_PORT = 1024, 65535
_CHUNK = 65536  # records per chunk written


@dataclass(frozen=True)
class Source:
    """A recorded session's records, shifted so that its first event is at 0."""

    records: np.ndarray  # uint8 [n, record_size]
    ts: np.ndarray  # uint64 [n], relative to the first event
    client_ports: tuple[int, ...]  # ports to give fresh values in every copy
    port_slot: list[np.ndarray]  # per port offset: index into client_ports, -1 = keep


@dataclass(frozen=True)
class SynthSummary:
    events: int
    connections: int  # distinct client ports written (one connection each in the sources)
    copies: int
    span_ns: int


def _load(path: Path, service_ip: str) -> tuple[Source, int]:
    reader = open_session(path)
    size = reader.header.record_size
    payload = b"".join(b"".join(batch) for batch in reader.record_batches())
    rec = np.frombuffer(payload, dtype=np.uint8).reshape(-1, size).copy()
    ts = rec[:, 0:8].copy().view("<u8").ravel()
    ports = [rec[:, o : o + 2].copy().view(">u2").ravel() for o in _PORT_OFFSETS]
    # Client ports: the source port of packets to the service, the destination port
    # of packets from it (before NAT, so that is the client's own port).
    pkt = LAYOUT["pkt"][0]
    svc = np.frombuffer(socket.inet_aton(service_ip), dtype=np.uint8)
    to_svc = (rec[:, pkt + 4 : pkt + 8] == svc).all(axis=1)
    from_svc = (rec[:, pkt : pkt + 4] == svc).all(axis=1)
    cand = np.unique(np.concatenate([ports[0][to_svc], ports[1][from_svc]]))
    client = tuple(int(p) for p in cand if p)
    lookup = {p: i for i, p in enumerate(client)}
    slots = [np.array([lookup.get(int(v), -1) for v in col], dtype=np.int64) for col in ports]
    first = int(ts.min()) if len(ts) else 0
    return Source(rec, ts - np.uint64(first), client, slots), size


def synthesize(
    sources: list[Path],
    out: Path,
    *,
    events: int,
    period_ns: int = 250_000_000,
    overwrite: bool = False,
) -> SynthSummary:
    """Write at least `events` events to out: the sources in turn, one copy per period_ns
    each (copy k of source i starts at (k * len(sources) + i) * period_ns after the first
    source's first event), each with fresh client ports. The header (topology, service,
    scope) is the first source's."""
    if not sources:
        raise HairtraceError("synthesize: no source session")
    first = open_session(sources[0])
    header, footer = first.header, first.footer
    loaded = [_load(p, header.service_ip) for p in sources]
    if any(size != header.record_size for _s, size in loaded):
        raise HairtraceError("synthesize: the sources have different record sizes")
    srcs = [s for s, _size in loaded]
    per_round = sum(len(s.ts) for s in srcs)
    if per_round == 0:
        raise HairtraceError("synthesize: the sources hold no events")
    rounds = -(-events // per_round)
    ports_needed = rounds * sum(len(s.client_ports) for s in srcs)
    if ports_needed > _LAST_PORT - _FIRST_PORT + 1:
        raise HairtraceError(
            f"synthesize: {events} events need {ports_needed} client ports (at most "
            f"{_LAST_PORT - _FIRST_PORT + 1}): use fewer events"
        )
    origin = header.start_ns + 1_000_000
    next_port, written, last_ts, slot = _FIRST_PORT, 0, origin, 0
    pending: list[np.ndarray] = []
    with SessionWriter(out, header, overwrite=overwrite) as w:
        for _k in range(rounds):
            for src in srcs:
                rec = src.records.copy()
                shift = np.uint64(origin + slot * period_ns)
                rec[:, 0:8] = (src.ts + shift).astype("<u8").view(np.uint8).reshape(-1, 8)
                fresh = np.arange(next_port, next_port + len(src.client_ports), dtype=">u2")
                for off, idx in zip(_PORT_OFFSETS, src.port_slot, strict=True):
                    hit = idx >= 0
                    col = rec[:, off : off + 2].copy().view(">u2").ravel()
                    col[hit] = fresh[idx[hit]]
                    rec[:, off : off + 2] = col.view(np.uint8).reshape(-1, 2)
                next_port += len(src.client_ports)
                last_ts = int(src.ts.max() + shift)
                slot += 1
                pending.append(rec)
                written += len(rec)
                if sum(len(p) for p in pending) >= _CHUNK:
                    pending = _flush(w, pending, whole=True)
        _flush(w, pending, whole=False)
        end = last_ts + 1_000_000_000
        if footer is not None:
            w.close(replace(footer, end_ns=end, events=written, loss_windows=()))
        else:
            w.close()
    return SynthSummary(written, next_port - _FIRST_PORT, slot, end - origin)


def _flush(w: SessionWriter, pending: list[np.ndarray], *, whole: bool) -> list[np.ndarray]:
    """Write the pending records (only whole chunks of _CHUNK when `whole`); the rest."""
    if not pending:
        return []
    rec = np.concatenate(pending)
    n = len(rec) - len(rec) % _CHUNK if whole else len(rec)
    buf, size = rec[:n].tobytes(), w.header.record_size
    if n:
        w.write_records([buf[i : i + size] for i in range(0, len(buf), size)])
    return [rec[n:]] if n < len(rec) else []
