"""A live trace: choose a provider, load and attach, drain events, analyse, report.

Wires tracer.kernel (BPF) to the pure analysis and to sinks (live view). The
caller gets a TraceResult; nothing here prints or exits.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np

from tracer import __version__
from tracer.analysis.context import (
    ConntrackStats,
    Context,
    RuleDrop,
    SysctlChange,
    TopologyNames,
    node_scope,
    scope_fields,
)
from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.finalize import Finished
from tracer.analysis.reassemble import Connection
from tracer.analysis.stream import StreamAnalyser
from tracer.errors import HairtraceError, UsageError
from tracer.events import codec as kevents
from tracer.events.model import Point, point_info
from tracer.events.rows import CODEC, rows_of
from tracer.kernel.backends import EventReader, Loaded, choose_backend
from tracer.kernel.features import probe
from tracer.kernel.ksyms import load_text
from tracer.kernel.libbpf import BpfObject, Libbpf
from tracer.kernel.objfile import ENV, object_path  # $HAIRTRACE_BPF_OBJ, checkout, wheel
from tracer.kernel.providers import Provider, choose, moved_points
from tracer.kernel.pseudonyms import Pseudonyms
from tracer.kernel.ringbuf import open_reader
from tracer.kernel.ringbuf import records as split_records
from tracer.options import DEFAULT_DATA_BUDGET, PROTOCOLS
from tracer.present.report import RunInfo
from tracer.topology import NetnsRef, Topology, resolve_netns, snapshot
from tracer.topology.counters import (
    collect_counters,
    conntrack_between,
    conntrack_of,
    drops_between,
    service_entries_of,
    sysctls_of,
)
from tracer.topology.services import (
    addresses_in_range,
    node_view,
    range_addresses,
    resolve_name,
)

if TYPE_CHECKING:
    from tracer.present.metrics import TraceMetrics

HT_PT_MAX = 32
HT_PROTO_BITS = {"tcp": 0x01, "udp": 0x02}  # struct ht_config.protos (bpf/hairtrace.h)


@dataclass(frozen=True)
class TraceOptions:
    service_ip: str
    service_port: int  # 0 = any
    netns: str | None = None  # where the netfilter hooks go; None = caller's
    duration: float | None = None
    command: tuple[str, ...] = ()
    provider: str = "auto"
    grace: float = 1.0  # keep tracing after CMD exits, for late replies and resets
    poll_ms: int = 50
    ringbuf_bytes: int | None = None  # power of two, multiple of the page size; None = built-in
    ready_file: str | None = None  # written once every probe is attached (for scripts)
    all_netns: bool = False  # analyse every namespace, not only the node and its pods
    record: str | None = None  # session file to record to
    force: bool = False  # overwrite an existing session file
    # --record-rotate LIMIT (tracer.session.rotate.parse_limit) and --record-keep N
    record_rotate: str | None = None
    record_keep: int = 3
    data_budget: int = DEFAULT_DATA_BUDGET  # non-control TCP packets per tuple/point/device
    backend: str = "auto"  # auto | core (libbpf CO-RE) | bcc
    btf: str | None = None  # external BTF file for CO-RE on a kernel without BTF
    command_stdout_to_stderr: bool = False  # keeps stdout for the report alone (--json -)
    protocols: tuple[str, ...] = PROTOCOLS  # of the service: tcp, udp (ICMP errors follow them)
    # a Service by name ("ns/name"), resolved from the node's kube-proxy rules at start;
    # service_ip is then "" until resolve_service fills it (and service_port, protocols)
    service_name: str | None = None
    service_port_name: str | None = None
    metrics: tuple[str, int] | None = None  # --metrics HOST:PORT: Prometheus while tracing
    # a range of Service addresses: service_ip/service_prefix (service_port 0); 32: one
    service_prefix: int = 32
    # a range's Service addresses from the node's kube-proxy rules (range_services), which
    # the kernel traces instead of every address in the range; () = every address
    service_set: tuple[str, ...] = ()


def resolve_service(opts: TraceOptions, netns: NetnsRef) -> TraceOptions:
    """opts with a Service given by name resolved to its address, port and protocols by
    kube-proxy's rules in the node netns; opts as it is when given by address."""
    if opts.service_name is None:
        return opts
    ip, port, protocols = resolve_name(
        service_entries_of(netns.path), opts.service_name, opts.service_port,
        opts.service_port_name, opts.protocols, netns.name,
    )  # fmt: skip
    return replace(opts, service_ip=ip, service_port=port, protocols=protocols)


@dataclass
class Stats:
    """Counters the live view shows while tracing."""

    events: int = 0
    lost: int = 0
    lost_by_point: dict[str, int] = field(default_factory=dict)


@dataclass
class TraceResult:
    """What a trace ends with. results: every connection in judgment order, kept only
    when run_trace was asked to (keep_results; a sink gets them as they are judged);
    chunks: the raw records, kept only with keep_records (fixtures)."""

    run: RunInfo
    context: Context
    topology: Topology
    results: list[tuple[Connection, Diagnosis]]
    chunks: list[np.ndarray] = field(default_factory=list, repr=False)  # raw, (n, 128) uint8

    @property
    def records(self) -> list[bytes]:
        """The raw ring-buffer records one by one, for fixtures (built on demand)."""
        return split_records(np.concatenate(self.chunks)) if self.chunks else []


class Sink(Protocol):
    """Receives a live trace's connections as they are judged (the summary, the report)
    and, when `live`, the open ones from time to time (the live view)."""

    live: bool

    def attached(self, run: RunInfo) -> None: ...

    def judged(self, done: list[Finished]) -> None:
        """Connections just judged, in judgment order: each one once."""
        ...

    def update(self, open_now: list[Finished], stats: Stats) -> None:
        """The connections still open, provisionally judged (only when `live`)."""
        ...


def proto_bits(protocols: tuple[str, ...]) -> int:
    """struct ht_config.protos of the protocols traced."""
    bits = 0
    for p in protocols:
        bits |= HT_PROTO_BITS[p]
    return bits


def service_mask(prefix: int) -> bytes:
    """struct ht_config.svc_mask of a prefix length (network byte order)."""
    return ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF).to_bytes(4, "big")


def _config(opts: TraceOptions) -> bytes:
    """struct ht_config (bpf/hairtrace.h)."""
    return struct.pack(
        "=4s2sBB4sB3x",
        socket.inet_aton(opts.service_ip),
        opts.service_port.to_bytes(2, "big"),
        proto_bits(opts.protocols),
        opts.data_budget,
        service_mask(opts.service_prefix),
        1 if opts.service_set else 0,
    )


def range_services(opts: TraceOptions, netns: NetnsRef) -> TraceOptions:
    """opts with, for a range (--svc CIDR), the Service addresses kube-proxy's rules in the
    node netns hold in it: the kernel then traces those, not every address of the range
    (a lab's range may hold its pods too). A node without such rules traces the range."""
    if opts.service_prefix == 32:
        return opts
    found = addresses_in_range(service_entries_of(netns.path), opts.service_ip,
                               opts.service_prefix) or ()  # fmt: skip
    return replace(opts, service_set=tuple(sorted(found, key=ipaddress.ip_address)))


def summed_counters(copies: list[bytes]) -> bytes:
    """struct ht_counters (bpf/hairtrace.bpf.c) summed over the CPUs' copies."""
    n = 3 * HT_PT_MAX
    total = [0] * n
    for raw in copies:
        for i, v in enumerate(struct.unpack_from(f"<{n}Q", raw)):
            total[i] += v
    return struct.pack(f"<{n}Q", *total)


class _Losses:
    """Ring-buffer losses from the kernel's counters, turned into time windows.

    A window spans from before the previous read to after this one, so a loss
    counted now certainly happened inside it (the windows overlap slightly).
    """

    def __init__(self, counters: Callable[[], bytes], clock: Callable[[], int]) -> None:
        self.counters, self.clock = counters, clock
        self.total = 0
        self.by_point: dict[str, int] = {}
        self.windows: list[tuple[int, int]] = []
        self.over_budget: dict[str, int] = {}
        self._prev_start = clock()

    def check(self) -> None:
        start = self.clock()
        # emitted, lost, over_budget: [HT_PT_MAX] each (struct ht_counters)
        raw = self.counters()
        lost = struct.unpack_from(f"<{HT_PT_MAX}Q", raw, HT_PT_MAX * 8)
        over = struct.unpack_from(f"<{HT_PT_MAX}Q", raw, 2 * HT_PT_MAX * 8)
        self.over_budget = {point_info(i).name: n for i, n in enumerate(over) if n}
        if sum(lost) > self.total:
            self.windows.append((self._prev_start, self.clock()))
            self.total = sum(lost)
            self.by_point = {point_info(i).name: n for i, n in enumerate(lost) if n}
        self._prev_start = start


def process_age() -> float:
    """Seconds since this process started (start-up cost includes interpreter and imports)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def _start_command(
    cmd: tuple[str, ...], stdout_to_stderr: bool = False
) -> subprocess.Popen[bytes] | None:
    if not cmd:
        return None
    try:
        return subprocess.Popen(list(cmd), stdout=2 if stdout_to_stderr else None)
    except FileNotFoundError:
        raise UsageError(f"command not found: {cmd[0]}") from None
    except PermissionError:
        raise UsageError(f"command not executable: {cmd[0]}") from None


def _stop_command(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class _StopFlag:
    """SIGINT / SIGTERM end the trace cleanly (report, detach) instead of killing it."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, _sig: int, _frame: object) -> None:
        self.set = True

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _load(opts: TraceOptions) -> Loaded:
    """Choose the backend and provider and load the programs (configured, not yet attached)."""
    backend, backend_reason = choose_backend(opts.backend, opts.btf)
    if backend == "bcc":
        from tracer.kernel import bcc_backend

        if opts.provider not in ("auto", "kprobe"):
            raise UsageError(f"provider {opts.provider}: the bcc backend has only kprobe")
        return bcc_backend.load(opts.service_ip, opts.service_port, opts.ringbuf_bytes,
                                opts.data_budget, backend_reason,
                                proto_bits(opts.protocols), service_mask(opts.service_prefix),
                                opts.service_set)  # fmt: skip
    lib, obj, provider, reason = _load_core(opts)
    return Loaded(
        "core", backend_reason, provider.name, reason, obj,
        attach=lambda netns_path: provider.attach(obj, netns_path),
        open_reader=lambda: open_reader(lib, obj.map_fd("events"), obj.map_max_entries("events")),
        ring_bytes=obj.map_max_entries("events"),
        counters=lambda: summed_counters(obj.lookup_percpu("counters")),
        skipped=provider.skipped,
        nf_priorities=lambda: dict(getattr(provider, "priorities", {})),
    )  # fmt: skip


def _load_core(opts: TraceOptions) -> tuple[Libbpf, BpfObject, Provider, str]:
    """libbpf CO-RE: choose the provider and load its programs.

    A function program this kernel cannot load (missing BTF, inlined target)
    is dropped by the provider with a note, and the object loaded again.
    """
    lib = Libbpf()
    feats = probe(lib)
    provider, reason = choose(opts.provider, feats, custom_btf=opts.btf is not None)
    # direct reads need bpf_rdonly_cast in the kernel's own BTF (not a --btf file's); an
    # object this kernel refuses for another reason is tried again with helper copies
    direct = feats.direct_reads and opts.btf is None and ENV not in os.environ
    while True:
        obj = BpfObject(lib, str(object_path(direct)), btf_custom_path=opts.btf)
        try:
            provider.prepare(obj)
            obj.set_rodata(_config(opts))
            if opts.ringbuf_bytes:
                obj.set_max_entries("events", opts.ringbuf_bytes)
            obj.load()
            for ip in opts.service_set:
                obj.update_elem("services", socket.inet_aton(ip), b"\x01")
            return lib, obj, provider, reason
        except HairtraceError:
            obj.close()
            if provider.exclude_failed("".join(lib.log.lines)):
                continue
            if not direct:
                raise
            direct = False
            reason += "; packet headers copied by a helper (the direct-read object failed to load)"
        except BaseException:
            obj.close()
            raise


def _check_options(opts: TraceOptions) -> None:
    size = opts.ringbuf_bytes
    if size is not None and (size < 4096 or size & (size - 1)):
        raise UsageError(f"ring buffer size {size}: must be a power of two >= 4096")
    if opts.command and shutil.which(opts.command[0]) is None:
        raise UsageError(f"command not found: {opts.command[0]}")
    if opts.record:
        from tracer.session import check_target

        check_target(opts.record, overwrite=opts.force)
        if opts.record_rotate:
            from tracer.session.rotate import check_keep, existing, parse_limit

            parse_limit(opts.record_rotate)
            check_keep(opts.record_keep)
            old = existing(Path(opts.record))
            if old and not opts.force:
                raise UsageError(f"session file {old[0]} exists (use --force to overwrite)")


@dataclass
class _Live:
    """What one trace does with each drained batch, and all it keeps of them.

    Kernel addresses (skb, conntrack entry, drop location) are replaced by per-trace
    ids as records arrive, so nothing downstream (analysis, live view, session, report)
    ever holds one; the batch is then recorded and fed to the analysis engine (`judge`),
    which keeps only the connections still open. Raw records are kept only for
    fixtures (`keep_records`).
    """

    judge: Callable[[np.ndarray], None] | None = None  # the engine's feed, once it exists
    keep_records: bool = False
    chunks: list[np.ndarray] = field(default_factory=list)  # raw, (n, 128) uint8
    count: int = 0
    writer: Any = None  # tracer.session.SessionWriter when recording
    pseudonyms: Pseudonyms = field(default_factory=Pseudonyms)
    # ht_point -> priority actually attached at, where not the compiled one in nf_prio
    nf_moved: dict[int, int] = field(default_factory=dict)

    def add(self, batch: np.ndarray) -> None:
        """One drained batch: addresses replaced, recorded, analysed (kept for fixtures)."""
        if not len(batch):
            return
        self.pseudonyms.rewrite(batch)  # every backend's drain returns its own copy
        if self.nf_moved:
            set_nf_prio(batch, self.nf_moved)
        self.count += len(batch)
        if self.writer is not None:
            self.writer.write_records(batch)
        if self.keep_records:
            self.chunks.append(batch)
        if self.judge is not None:
            self.judge(batch)

    def location_names(self) -> dict[int, str]:
        """Drop location id -> 'function+0xoff', from /proc/kallsyms (read once, at the end)."""
        if not self.pseudonyms.count("location"):
            return {}
        return self.pseudonyms.location_names(load_text().function_at)


def set_nf_prio(batch: np.ndarray, moved: dict[int, int]) -> None:
    """Write into a batch of raw records the priority each netfilter point's program
    really sits at: the BPF side knows only the one compiled into it."""
    rec = batch.view(kevents.EVENT_DTYPE)[:, 0]  # a view of the (n, EVENT_SIZE) rows
    for pt, prio in moved.items():
        rec["nf_prio"][rec["point"] == pt] = prio


def _drain(
    opts: TraceOptions,
    rb: EventReader,
    ring_bytes: int,
    live: _Live,
    losses: _Losses,
    update: Callable[[], None],
) -> int | None:
    """Poll until the duration ends, CMD exits (+grace) or a signal; CMD's exit status.

    update() (silent connections judged, the live view refreshed) runs every 0.25 s, or
    less often when it takes longer: at most a fifth of the loop's time goes to it.
    After a small batch the loop pauses briefly (at most 4 ms, less for a small
    ring buffer) so each wake-up drains many records: under a steady stream of
    events the BPF side wakes the reader every 64 KiB, and a drain per wake-up
    cost about a third of a core at a few hundred thousand events a second.
    """
    pace_s = min(0.004, ring_bytes / 1e9)  # at most a quarter of the ring at 1 GB/s
    with _StopFlag() as stop:
        proc = _start_command(opts.command, opts.command_stdout_to_stderr)
        try:
            deadline = time.monotonic() + opts.duration if opts.duration else None
            cmd_done_at: float | None = None
            next_update = 0.0
            while not stop.set:
                rb.wait(opts.poll_ms)
                batch = rb.drain()
                losses.check()  # before the analysis judges what the losses touched
                live.add(batch)
                if 0 < batch.nbytes < ring_bytes // 8:
                    time.sleep(pace_s)
                now = time.monotonic()
                if now >= next_update:
                    update()
                    done = time.monotonic()
                    next_update = done + max(0.25, 4 * (done - now))
                if deadline is not None and now >= deadline:
                    break
                if proc is not None and cmd_done_at is None and proc.poll() is not None:
                    cmd_done_at = now
                if cmd_done_at is not None and now - cmd_done_at >= opts.grace:
                    break
        finally:
            status = _stop_command(proc)
    return status


LIVE_LAG_NS = 1_000_000_000  # records still in the ring buffer are younger than this
RESNAPSHOT_S = 1.0  # at most one topology snapshot per second for unknown namespaces
RULES_EVERY_S = 1.0  # rule counters re-read at most this often, when drops are seen
SYSCTLS_EVERY_NS = 200_000_000  # the node's sysctls are sampled this often


class _Judge:
    """The analysis engine of a live trace, and what the trace learns while it runs:
    loss windows, namespaces created after the first snapshot (a new pod), the kernel's
    drop reason names and the rule counters (read when a drop is seen). The engine
    judges each connection with what was known when it was over."""

    def __init__(
        self,
        opts: TraceOptions,
        node: NetnsRef,
        topo: Topology,
        losses: _Losses,
        clock: Callable[[], int],
        out: Callable[[list[Finished]], None],
    ) -> None:
        self.opts, self.node, self.topo, self.losses, self.clock = opts, node, topo, losses, clock
        self.out = out
        self.retaken = False
        self.drops: dict[int, str] | None = drop_reason_names() if opts.record else None
        self.counters_before = collect_counters(node.path)  # before CMD starts any traffic
        self.rule_drops: tuple[RuleDrop, ...] = ()
        self.conntrack_before = conntrack_of(node.path)
        self.conntrack = conntrack_between(None, self.conntrack_before)
        self._rules_at = 0.0
        self._snap_at = 0.0
        self._unknown: set[int] = set()  # namespaces no snapshot found
        self._windows = 0
        # the node's sysctls, sampled every SYSCTLS_EVERY_NS: what changed, and when
        self.sysctl_changes: list[SysctlChange] = []
        self._sysctls = sysctls_of(node.path)
        self._sysctls_ns = clock()
        self.engine = StreamAnalyser(self.context(clock()), CODEC)

    def context(self, end_ns: int) -> Context:
        scope = _scope(self.opts, self.topo, self.node.inode)
        return _context(self.opts, self.topo, self.losses.windows, end_ns, self.drops or {},
                        scope, self.rule_drops, self.node.inode,
                        tuple(self.sysctl_changes), self.conntrack)  # fmt: skip

    def feed(self, batch: np.ndarray) -> None:
        rec = batch.view(kevents.EVENT_DTYPE)[:, 0]
        changed = self._learn(rec)
        if changed or len(self.losses.windows) != self._windows:
            self._windows = len(self.losses.windows)
            self.engine.set_context(self.context(self.clock()))
        self.out(self.engine.feed(rows_of(batch)))

    def tick(self) -> None:
        """Judge what went silent (no event comes to say so); sample the sysctls."""
        if self._sample_sysctls() or len(self.losses.windows) != self._windows:
            self._windows = len(self.losses.windows)
            self.engine.set_context(self.context(self.clock()))
        self.out(self.engine.advance(self.clock() - LIVE_LAG_NS))

    def finish(self, end_ns: int) -> Context:
        """Judge every connection still open; the final Context."""
        self.rule_drops = drops_between(self.counters_before, collect_counters(self.node.path))
        self.conntrack = self._conntrack_now()
        if self.drops is None:
            self.drops = {}
        ctx = self.context(end_ns)
        self.engine.set_context(ctx)
        self.out(self.engine.finish(end_ns))
        return ctx

    def _sample_sysctls(self) -> bool:
        """Read the node's sysctls again (at most every SYSCTLS_EVERY_NS); whether one
        changed. A change is placed between this sample and the previous one."""
        now = self.clock()
        if now - self._sysctls_ns < SYSCTLS_EVERY_NS or self._sysctls is None:
            return False
        seen = sysctls_of(self.node.path)
        if seen is None:
            return False
        changed = [k for k in sorted(seen) if seen[k] != self._sysctls.get(k)]
        for key in changed:
            self.sysctl_changes.append(SysctlChange(
                self._sysctls_ns, now, self.node.inode, key, self._sysctls.get(key), seen[key]
            ))  # fmt: skip
        self._sysctls, self._sysctls_ns = seen, now
        return bool(changed)

    def _learn(self, rec: np.ndarray) -> bool:
        """What this batch tells about the node before its connections are judged."""
        changed = False
        now = time.monotonic()
        ns = [  # 0: a record of no namespace (an skb freed without its device)
            n for n in np.unique(rec["netns"]).tolist() if n and self.topo.namespace(n) is None
        ]
        fresh = [n for n in ns if n not in self._unknown]
        if fresh and now - self._snap_at >= RESNAPSHOT_S:
            self._snap_at = now
            self.topo = snapshot(
                self.opts.service_ip, self.opts.service_port or None,
                prefix=self.opts.service_prefix,
            )  # fmt: skip
            self.retaken = changed = True
            self._unknown.update(n for n in fresh if self.topo.namespace(n) is None)
        if (rec["point"] == Point.DROP).any():
            if self.drops is None:
                self.drops, changed = drop_reason_names(), True
            if now - self._rules_at >= RULES_EVERY_S:
                self._rules_at = now
                after = collect_counters(self.node.path)
                self.rule_drops, changed = drops_between(self.counters_before, after), True
                self.conntrack = self._conntrack_now()
        return changed

    def _conntrack_now(self) -> ConntrackStats | None:
        """The node's conntrack table now, its counters since the start (read while drops
        are seen: a table that was full then may have room again at the end)."""
        now = conntrack_between(self.conntrack_before, conntrack_of(self.node.path))
        was = self.conntrack
        if now is not None and was is not None and was.full and not now.full:
            now = replace(now, count=was.count, max=was.max)  # it was full: keep that
        return now


def run_trace(
    opts: TraceOptions,
    sink: Sink | None = None,
    clock: Callable[[], int] = time.monotonic_ns,
    announce: Callable[[RunInfo], None] | None = None,
    *,
    keep_results: bool = True,
    keep_records: bool = False,
) -> TraceResult:
    """Trace until the duration ends, CMD exits (+grace), or SIGINT/SIGTERM.

    Every connection is judged by the analysis engine as soon as it is over and handed
    to sink.judged(); keep_results also keeps them all for the TraceResult (short
    traces, tests), keep_records the raw records (fixtures). announce(run), when given,
    is called once every probe is attached (before CMD starts): for a caller without a
    live view that still says what matters at start (warnings).
    """
    t0 = time.monotonic()
    netns = resolve_netns(opts.netns)
    opts = range_services(resolve_service(opts, netns), netns)
    _check_options(opts)
    metrics = _bind_metrics(opts)  # before anything loads: a busy port fails at once
    try:
        loaded = _load(opts)
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    obj = loaded.obj
    live, losses = _Live(keep_records=keep_records), _Losses(loaded.counters, clock)
    kept: list[tuple[Connection, Diagnosis]] = []

    def out(done: list[Finished]) -> None:
        if not done:
            return
        if keep_results:
            kept.extend((f.conn, f.diag) for f in done)
        if sink is not None:
            sink.judged(done)
        if opts.record_rotate and live.writer is not None:  # which segments hold evidence
            live.writer.judged(
                (f.conn.first_ns, f.conn.last_ns, f.diag.verdict)
                for f in done
                if f.diag.verdict != "ok"
            )
        if metrics is not None:
            metrics.judged(done)

    rb: EventReader | None = None
    try:
        attached = loaded.attach(netns.path)
        nf_priorities = loaded.nf_priorities()
        live.nf_moved = moved_points(nf_priorities)
        ring_bytes = loaded.ring_bytes
        rb = loaded.open_reader()
        attach_s, since_start = process_age(), time.monotonic() - t0
        start_ns, started_at = clock(), time.time()
        topo = snapshot(opts.service_ip, opts.service_port or None, prefix=opts.service_prefix)
        judge = _Judge(opts, netns, topo, losses, clock, out)
        live.judge = judge.feed
        view = node_view(topo, netns.inode, opts.service_ip, opts.service_port, opts.protocols,
                         opts.service_prefix)  # fmt: skip
        run = RunInfo(
            __version__, os.uname().release, loaded.provider, loaded.provider_reason,
            opts.service_ip, opts.service_port, netns.name, attached=tuple(attached),
            skipped=dict(loaded.skipped), backend=loaded.backend,
            backend_reason=loaded.backend_reason, compile_seconds=loaded.compile_seconds,
            attach_seconds=round(attach_s, 3), trace_attach_seconds=round(since_start, 3),
            started_at=started_at, start_ns=start_ns,
            command=opts.command, service_ports=view.ports, warnings=view.warnings,
            nf_priorities=nf_priorities, protocols=opts.protocols, service_name=view.name,
            service_port_name=view.port_name, service_endpoints=view.endpoints,
            service_prefix=opts.service_prefix, service_names=view.names,
        )  # fmt: skip
        if announce is not None:
            announce(run)
        stats = Stats()
        if sink:
            sink.attached(run)
        if metrics is not None:
            _serve_metrics(metrics, topo, netns.inode, live, losses)

        def update() -> None:
            judge.tick()
            if sink is not None and sink.live:
                stats.events, stats.lost = live.count, losses.total
                stats.lost_by_point = losses.by_point
                sink.update(judge.engine.peek(), stats)
            if opts.record_rotate and live.writer is not None:
                live.writer.settle(judge.engine)

        if opts.record_rotate:
            live.writer = _open_rotating(opts, run, judge, losses, live, netns.inode)
        else:
            live.writer = _open_recording(opts, run, topo, judge.drops or {}, netns.inode)
        if opts.ready_file:
            Path(opts.ready_file).write_text(f"{attach_s:.3f}\n")
        status = _drain(opts, rb, ring_bytes, live, losses, update)
        obj.detach_all()
        last = rb.drain()
        losses.check()
        live.add(last)
        end_ns = clock()
        ctx = judge.finish(end_ns)
    finally:
        if rb is not None:
            rb.close()
        obj.close()
        if metrics is not None:
            metrics.close()  # the trace ended: so does the endpoint
        if live.writer is not None and sys.exc_info()[0] is not None:
            live.writer.close()  # no footer: the file reads as a trace that did not finish
    # service_ports and warnings stay what was said at start (the report's head)
    topo, retaken, rule_drops = judge.topo, judge.retaken, judge.rule_drops
    engine = judge.engine
    scope = scope_fields(engine.events_out_of_scope, topo, ctx.scope)
    run = replace(run, events=live.count, lost_events=losses.total,
                  lost_by_point=losses.by_point, command_status=status,
                  data_budget=opts.data_budget,
                  over_budget_events=sum(losses.over_budget.values()),
                  over_budget_by_point=losses.over_budget,
                  rule_drops=rule_drops, sysctl_changes=tuple(judge.sysctl_changes),
                  conntrack=judge.conntrack, **scope)  # fmt: skip
    if live.writer is not None:
        from tracer.session import footer_from_trace

        footer = footer_from_trace(
            run,
            end_ns=end_ns,
            loss_windows=losses.windows,
            topology=topo if retaken else None,
            rule_drops_netns=netns.inode,
            locations=live.location_names(),
            sysctl_changes=judge.sysctl_changes,
        )
        live.writer.close(footer)
        if opts.record_rotate:
            run = replace(run, recording=live.writer.recording())
    return TraceResult(run, ctx, topo, kept, live.chunks)


def _bind_metrics(opts: TraceOptions) -> TraceMetrics | None:
    """The --metrics endpoint, bound (prometheus_client is imported only then)."""
    if opts.metrics is None:
        return None
    from tracer.present.metrics import TraceMetrics

    return TraceMetrics(*opts.metrics)


def _serve_metrics(
    metrics: TraceMetrics, topo: Topology, node: int, live: _Live, losses: _Losses
) -> None:
    """Serve from now on: the node's Services name the connections; the trace's counters
    are read when scraped (each is replaced, never changed in place, by the drain loop)."""
    from tracer.present.metrics import TraceCounters

    ns = topo.namespace(node)
    metrics.start(
        ns.service_entries if ns is not None else None,
        lambda: TraceCounters(live.count, losses.by_point, losses.over_budget),
    )


def _open_recording(
    opts: TraceOptions, run: RunInfo, topo: Topology, drops: dict[int, str], node: int
) -> Any:
    """The session writer when recording (tracer.session is imported only then)."""
    if not opts.record:
        return None
    from tracer.session import SessionWriter, header_from_trace

    header = header_from_trace(run, topo, drops, netns_inode=node, all_netns=opts.all_netns)
    return SessionWriter(opts.record, header, overwrite=opts.force)


@dataclass
class _Counted:
    total: int = 0
    by_point: dict[str, int] = field(default_factory=dict)


def _open_rotating(
    opts: TraceOptions, run: RunInfo, judge: _Judge, losses: _Losses, live: _Live, node: int
) -> Any:
    """A rotating recording (tracer.session.rotate): each segment gets a header with the
    topology as it is then, and, when rotated, a footer with its own events and losses."""
    from tracer.session import SessionFooter, footer_from_trace, header_from_trace
    from tracer.session.rotate import RotatingWriter, Segment, parse_limit

    base = _Counted()  # the losses counted when the segment opened

    def header_at(seq: int, now: int) -> Any:
        if seq > 1:  # its own origin, on the same clocks
            wall = run.started_at + (now - run.start_ns) / 1e9 if run.started_at else None
            seg_run = replace(run, start_ns=now, started_at=wall)
        else:
            seg_run = run
        base.total, base.by_point = losses.total, dict(losses.by_point)
        return header_from_trace(seg_run, judge.topo, judge.drops or {}, netns_inode=node,
                                 all_netns=opts.all_netns)  # fmt: skip

    def footer_at(seg: Segment, now: int) -> Any:
        was = base.by_point
        by_point = {k: n - was.get(k, 0) for k, n in losses.by_point.items() if n > was.get(k, 0)}
        lo = seg.first_ns if seg.first_ns is not None else seg.opened_ns
        seg_run = replace(
            run, events=seg.events, lost_events=losses.total - base.total,
            lost_by_point=by_point, data_budget=opts.data_budget,
            over_budget_events=sum(losses.over_budget.values()),
            over_budget_by_point=dict(losses.over_budget), rule_drops=judge.rule_drops,
            conntrack=judge.conntrack,
        )  # fmt: skip
        footer = footer_from_trace(
            seg_run, end_ns=now, loss_windows=[w for w in losses.windows if w[1] >= lo],
            topology=judge.topo if judge.retaken else None, rule_drops_netns=node,
            locations=live.location_names(), sysctl_changes=judge.sysctl_changes,
        )  # fmt: skip
        return replace(footer, recording=writer.recording())

    def last_footer(seg: Segment, footer: SessionFooter) -> SessionFooter:
        """The trace's final footer, with the losses of the last segment only."""
        was = base.by_point
        lo = seg.first_ns if seg.first_ns is not None else seg.opened_ns
        return replace(
            footer, lost_events=footer.lost_events - base.total,
            lost_by_point={k: n - was.get(k, 0) for k, n in footer.lost_by_point.items()
                           if n > was.get(k, 0)},
            loss_windows=tuple(w for w in footer.loss_windows if w[1] >= lo),
        )  # fmt: skip

    writer = RotatingWriter(
        opts.record or "", parse_limit(opts.record_rotate or ""), opts.record_keep,
        judge.engine.idle_ns, header_at, footer_at, last_footer=last_footer,
        overwrite=opts.force,
    )  # fmt: skip
    return writer


def drop_reason_names() -> dict[int, str]:
    """enum skb_drop_reason of the running kernel (numbers differ between versions)."""
    from tracer.kernel.btf import kernel_enum

    try:
        return kernel_enum("skb_drop_reason", "SKB_DROP_REASON_")
    except HairtraceError:
        return {}


def _context(
    opts: TraceOptions,
    topo: Topology,
    loss: list[tuple[int, int]],
    end_ns: int,
    drops: dict[int, str],
    scope: frozenset[int] | None = None,
    rule_drops: tuple[RuleDrop, ...] = (),
    rule_drops_netns: int | None = None,
    sysctl_changes: tuple[SysctlChange, ...] = (),
    conntrack: ConntrackStats | None = None,
) -> Context:
    names = TopologyNames(topo, sysctl_changes)
    addresses = range_addresses(topo, rule_drops_netns, opts.service_ip, opts.service_prefix)
    return Context(
        opts.service_ip, opts.service_port, names, end_ns, tuple(loss), drops, scope=scope,
        rule_drops=rule_drops, rule_drops_netns=rule_drops_netns, conntrack=conntrack,
        service_prefix=opts.service_prefix, service_addresses=addresses,
    )  # fmt: skip


def _scope(opts: TraceOptions, topo: Topology, node: int) -> frozenset[int] | None:
    return None if opts.all_netns else node_scope(topo, node)
