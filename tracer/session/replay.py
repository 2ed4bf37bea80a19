"""Replay a session file: rebuild what a live trace produces, without root or a kernel.

Both go through the one analysis engine (tracer.analysis.stream), fed the
session's chunks as the live trace fed it its drained batches. replay_stream()
analyses a session of any length in bounded memory, handing each connection to a
sink as it is judged; replay() keeps them all, with the events and records
(ReplayResult has the attribute names of tracer.trace.TraceResult, so the
summary and the JSON report take either).
header_from_trace / footer_from_trace build the header and footer from what
run_trace knows, for the recording side.

A recording without its footer (cut short, or still being written) has no loss
counters: its RunInfo says so (lost_events None, lost_events_unknown why), and the
connections last seen within a reply timeout of its end get a note (cut_short_note).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tracer import __version__
from tracer.analysis.context import (
    Context,
    SysctlChange,
    TopologyNames,
    node_scope,
    scope_fields,
)
from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.finalize import Finished
from tracer.analysis.reassemble import Connection
from tracer.analysis.stream import StreamAnalyser
from tracer.events.codec import decode_all
from tracer.events.model import Event
from tracer.events.rows import CODEC, rows_of
from tracer.present.report import RunInfo
from tracer.session.header import SessionFooter, SessionHeader
from tracer.session.reader import open_session
from tracer.topology.model import Topology
from tracer.topology.services import node_view, range_addresses

NO_FOOTER = "the recording has no footer: it was cut short or is still being written"


@dataclass(frozen=True)
class ReplayResult:
    """A replayed session: what a live trace returns, plus where it came from."""

    run: RunInfo
    events: list[Event]
    context: Context
    topology: Topology
    results: list[tuple[Connection, Diagnosis]]
    records: list[bytes]
    header: SessionHeader
    footer: SessionFooter | None  # None: the recording did not finish
    warnings: tuple[str, ...]  # cut-off file, missing footer, event count mismatch


def header_from_trace(
    run: RunInfo,
    topology: Topology,
    drop_reasons: dict[int, str],
    *,
    hostname: str | None = None,
    netns_inode: int | None = None,
    all_netns: bool = False,
) -> SessionHeader:
    """The session header for a live trace, once every probe is attached."""
    return SessionHeader(
        tool_version=run.tool_version,
        kernel=run.kernel,
        hostname=hostname if hostname is not None else socket.gethostname(),
        provider=run.provider,
        provider_reason=run.provider_reason,
        service_ip=run.service_ip,
        service_port=run.service_port,
        netns=run.netns,
        start_ns=run.start_ns,
        started_at=run.started_at,
        topology=topology,
        attached=tuple(run.attached),
        skipped=dict(run.skipped),
        attach_seconds=run.attach_seconds,
        trace_attach_seconds=run.trace_attach_seconds,
        command=tuple(run.command),
        drop_reasons=dict(drop_reasons),
        netns_inode=netns_inode,
        all_netns=all_netns,
        backend=run.backend,
        backend_reason=run.backend_reason,
        compile_seconds=run.compile_seconds,
        nf_priorities=dict(run.nf_priorities),
        protocols=run.protocols,
        service_prefix=run.service_prefix,
    )


def footer_from_trace(
    run: RunInfo,
    *,
    end_ns: int,
    loss_windows: Iterable[tuple[int, int]] = (),
    topology: Topology | None = None,
    rule_drops_netns: int | None = None,
    locations: dict[int, str] | None = None,
    sysctl_changes: Iterable[SysctlChange] = (),
) -> SessionFooter:
    """The session footer from the final RunInfo (its rule_drops were read in netns
    rule_drops_netns); topology only when it was re-taken; locations: drop location
    id -> function name."""
    return SessionFooter(
        end_ns=end_ns,
        events=run.events,
        # a live trace always knows its counters (None only comes from a replay)
        lost_events=run.lost_events or 0,
        lost_by_point=dict(run.lost_by_point or {}),
        loss_windows=tuple((a, b) for a, b in loss_windows),
        command_status=run.command_status,
        topology=topology,
        rule_drops=tuple(run.rule_drops or ()),
        rule_drops_netns=rule_drops_netns,
        data_budget=run.data_budget or 0,
        over_budget_events=run.over_budget_events or 0,
        over_budget_by_point=dict(run.over_budget_by_point or {}),
        locations=dict(locations or {}),
        sysctl_changes=tuple(sysctl_changes),
        conntrack=run.conntrack,
    )


def topology_of(header: SessionHeader, footer: SessionFooter | None) -> Topology:
    """The snapshot the analysis names things with: the final one when re-taken."""
    return footer.topology if footer is not None and footer.topology else header.topology


def context_of(header: SessionHeader, footer: SessionFooter | None, end_ns: int) -> Context:
    """The analysis Context of a recording (end_ns: the footer's, else the last event's)."""
    return Context(
        header.service_ip,
        header.service_port,
        TopologyNames(topology_of(header, footer), footer.sysctl_changes if footer else ()),
        footer.end_ns if footer is not None else end_ns,
        footer.loss_windows if footer is not None else (),
        dict(header.drop_reasons),
        scope=scope_of(header, footer),
        rule_drops=footer.rule_drops if footer is not None else (),
        rule_drops_netns=footer.rule_drops_netns if footer is not None else None,
        conntrack=footer.conntrack if footer is not None else None,
        service_prefix=header.service_prefix,
        service_addresses=range_addresses(
            header.topology, header.netns_inode, header.service_ip, header.service_prefix
        ),
    )


def scope_of(header: SessionHeader, footer: SessionFooter | None) -> frozenset[int] | None:
    """The namespaces the live trace analysed, derived the same way from the same snapshot."""
    if header.all_netns or header.netns_inode is None:
        return None
    return node_scope(topology_of(header, footer), header.netns_inode)


def run_info(header: SessionHeader, footer: SessionFooter | None, events: int) -> RunInfo:
    """The RunInfo of a replay: the recording's, analysed by this hairtrace version.
    Without a footer, the counters it holds (losses, data budget) are None: unknown."""
    # what the live trace said at its start (from the first snapshot)
    view = node_view(
        header.topology,
        header.netns_inode,
        header.service_ip,
        header.service_port,
        header.protocols,
        header.service_prefix,
    )
    return RunInfo(
        tool_version=__version__,
        kernel=header.kernel,
        provider=header.provider,
        provider_reason=header.provider_reason,
        backend=header.backend,
        backend_reason=header.backend_reason,
        compile_seconds=header.compile_seconds,
        service_ip=header.service_ip,
        service_port=header.service_port,
        protocols=header.protocols,
        netns=header.netns,
        events=events,
        lost_events=footer.lost_events if footer else None,
        lost_by_point=dict(footer.lost_by_point) if footer else None,
        data_budget=footer.data_budget if footer else None,
        over_budget_events=footer.over_budget_events if footer else None,
        over_budget_by_point=dict(footer.over_budget_by_point) if footer else None,
        lost_events_unknown=None if footer else NO_FOOTER,
        attached=header.attached,
        nf_priorities=dict(header.nf_priorities),
        skipped=dict(header.skipped),
        attach_seconds=header.attach_seconds,
        trace_attach_seconds=header.trace_attach_seconds,
        started_at=header.started_at,
        start_ns=header.start_ns,
        command=header.command,
        command_status=footer.command_status if footer else None,
        rule_drops=footer.rule_drops if footer else None,  # read at the end: unknown
        conntrack=footer.conntrack if footer else None,
        sysctl_changes=footer.sysctl_changes if footer else (),
        recording=footer.recording if footer else None,
        service_ports=view.ports,
        service_name=view.name,
        service_port_name=view.port_name,
        service_endpoints=view.endpoints,
        warnings=view.warnings,
        service_prefix=header.service_prefix,
        service_names=view.names,
    )


def cut_short_note(conn: Connection, diag: Diagnosis, ctx: Context) -> Diagnosis:
    """diag, with a note when conn was last seen within a reply timeout of the end of a
    recording without footer: events that followed (not yet drained or written when it
    stopped) and losses are unknown, so its verdict rests on what was recorded. The
    verdict stays: a recording still being written would otherwise judge differently
    from one read later. Connections ending earlier are unaffected by the cut."""
    before = ctx.end_ns - conn.last_ns
    if before > ctx.reply_timeout_ns:
        return diag
    note = (
        f"the recording stops {before / 1e9:.3f}s after this connection's last event and "
        "has no footer: later events of it may be missing, and losses are unknown"
    )
    return replace(diag, notes=(*diag.notes, note))


def replay(path: str | Path) -> ReplayResult:
    """A whole session analysed as the live trace analysed it: the same engine as
    replay_stream(), with every connection, event and record kept (small sessions,
    tests, diff)."""
    results: list[tuple[Connection, Diagnosis]] = []
    streamed = replay_stream(path, lambda f: results.append((f.conn, f.diag)))
    records: list[bytes] = []
    for batch in open_session(path).record_batches():
        records.extend(batch)
    return ReplayResult(
        run=streamed.run,
        events=decode_all(records),
        context=streamed.context,
        topology=streamed.topology,
        results=results,
        records=records,
        header=streamed.header,
        footer=streamed.footer,
        warnings=streamed.warnings,
    )


STREAM_BATCH = 65536  # events per batch of the streaming analysis (chunks are joined)


@dataclass(frozen=True)
class StreamStats:
    """How the streaming analysis went (memory is bounded by the first two)."""

    max_open_connections: int
    max_held_events: int  # events of open connections (and waiting for one) at most
    connections: int
    fast_connections: int  # recognised healthy without building their packets
    unmatched_events: int  # in scope but of no connection (analyse drops them too)


@dataclass(frozen=True)
class StreamedReplay:
    """A session analysed in bounded memory: a ReplayResult without events, records and
    results (those went to the caller's sink one connection at a time)."""

    run: RunInfo
    context: Context
    topology: Topology
    header: SessionHeader
    footer: SessionFooter | None
    warnings: tuple[str, ...]
    stats: StreamStats


def replay_stream(
    path: str | Path,
    sink: Callable[[Finished], None],
    *,
    batch_events: int = STREAM_BATCH,
    membership: Callable[[tuple[int, int, int], np.ndarray, np.ndarray], None] | None = None,
    **limits: int,
) -> StreamedReplay:
    """Analyse a session as replay() does, without holding its events: every connection
    goes to sink as soon as it is finished (Finished.order sorts them as replay() does).
    membership: see StreamAnalyser.on_membership. limits: quiet_ns / idle_ns /
    reorder_ns of tracer.analysis.stream.StreamAnalyser. Without a
    footer, the connections still open at the end get replay()'s cut_short_note (those
    finished earlier went quiet_ns, 2 s, before it: more than the note's reply timeout)."""
    reader = open_session(path)
    header, footer = reader.header, reader.footer
    ctx = context_of(header, footer, header.start_ns)  # end_ns: fixed below
    analyser = StreamAnalyser(ctx, CODEC, **limits)
    if membership is not None:
        analyser.on_membership(membership)
    done = 0
    for rows in _batches(reader.payloads(), header.record_size, batch_events):
        for f in analyser.feed(rows):
            sink(f)
            done += 1
    last = analyser.last_event_ns if analyser.last_event_ns is not None else header.start_ns
    ctx = context_of(header, footer, last)
    for f in analyser.finish(ctx.end_ns):
        sink(f if footer is not None else f._replace(diag=cut_short_note(f.conn, f.diag, ctx)))
        done += 1
    warnings = list(reader.warnings)
    if footer is not None and footer.events != analyser.events:
        warnings.append(
            f"session file {path}: the footer counts {footer.events} events, "
            f"the file holds {analyser.events}"
        )
    topology = topology_of(header, footer)
    scope = scope_fields(analyser.events_out_of_scope, topology, ctx.scope)
    return StreamedReplay(
        run=replace(run_info(header, footer, analyser.events), **scope),
        context=ctx,
        topology=topology,
        header=header,
        footer=footer,
        warnings=tuple(warnings),
        stats=StreamStats(
            analyser.max_open_connections,
            analyser.max_held_events,
            done,
            analyser.fast_connections,
            analyser.unmatched_events,
        ),
    )


def _batches(payloads: Iterable[bytes], record_size: int, size: int) -> Iterator[np.ndarray]:
    """Chunks as batches of about `size` records: small ones joined, big ones whole."""
    parts: list[bytes] = []
    count = 0
    for payload in payloads:
        n = len(payload) // record_size
        if n >= size // 2:  # big enough alone: no copy
            if parts:
                yield rows_of(b"".join(parts), record_size)
                parts, count = [], 0
            yield rows_of(payload, record_size)
            continue
        parts.append(payload)
        count += n
        if count >= size:
            yield rows_of(b"".join(parts), record_size)
            parts, count = [], 0
    if parts:
        yield rows_of(b"".join(parts), record_size)
