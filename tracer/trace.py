"""A live trace: choose a provider, load and attach, drain events, analyse, report.

Wires tracer.kernel (BPF) to the pure analysis and to sinks (live view). The
caller gets a TraceResult; nothing here prints or exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from tracer import __version__
from tracer.analysis import analyse
from tracer.analysis.context import Context, TopologyNames
from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.model import Event, Point, point_info
from tracer.analysis.reassemble import Connection
from tracer.errors import HairtraceError, UsageError
from tracer.kernel import events as kevents
from tracer.kernel.features import probe
from tracer.kernel.libbpf import BPF_MAP_TYPE_RINGBUF, BpfObject, Libbpf, RingBuffer
from tracer.kernel.providers import choose
from tracer.present.report import RunInfo
from tracer.topology import Topology, resolve_netns, snapshot

HT_PT_MAX = 32
IPPROTO_TCP = 6
DEFAULT_OBJECT = Path(__file__).resolve().parent.parent / "bpf" / "build" / "hairtrace.bpf.o"


def object_path() -> Path:
    path = Path(os.environ.get("HAIRTRACE_BPF_OBJ", DEFAULT_OBJECT))
    if not path.is_file():
        raise HairtraceError(f"BPF object {path} not found: run scripts/setup (make -C bpf)")
    return path


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


@dataclass
class Stats:
    """Counters the live view shows while tracing."""

    events: int = 0
    lost: int = 0
    lost_by_point: dict[str, int] = field(default_factory=dict)


@dataclass
class TraceResult:
    run: RunInfo
    events: list[Event]
    context: Context
    topology: Topology
    results: list[tuple[Connection, Diagnosis]]
    records: list[bytes]  # the raw ring-buffer records, for fixtures and recording


class Sink(Protocol):
    """Receives progress of a live trace (the rich live view, a recorder)."""

    def attached(self, run: RunInfo) -> None: ...

    def update(self, results: list[tuple[Connection, Diagnosis]], stats: Stats) -> None: ...


def _config(ip: str, port: int) -> bytes:
    """struct ht_config (bpf/hairtrace.h)."""
    return struct.pack("=4s2sBx", socket.inet_aton(ip), port.to_bytes(2, "big"), IPPROTO_TCP)


def _lost_counters(obj: BpfObject) -> tuple[int, dict[str, int]]:
    """Totals from the object's .bss: ht_emitted[HT_PT_MAX] then ht_lost[HT_PT_MAX]."""
    raw = obj.read_global(".bss")
    lost = struct.unpack_from(f"<{HT_PT_MAX}Q", raw, HT_PT_MAX * 8)
    by_point = {point_info(i).name: n for i, n in enumerate(lost) if n}
    return sum(lost), by_point


def process_age() -> float:
    """Seconds since this process started (start-up cost includes interpreter and imports)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def _start_command(cmd: tuple[str, ...]) -> subprocess.Popen[bytes] | None:
    if not cmd:
        return None
    try:
        return subprocess.Popen(list(cmd))
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


def run_trace(
    opts: TraceOptions, sink: Sink | None = None, clock: Callable[[], int] = time.monotonic_ns
) -> TraceResult:
    """Trace until the duration ends, CMD exits (+grace), or SIGINT/SIGTERM."""
    netns = resolve_netns(opts.netns)
    rb_size = opts.ringbuf_bytes
    if rb_size is not None and (rb_size < 4096 or rb_size & (rb_size - 1)):
        raise UsageError(f"ring buffer size {rb_size}: must be a power of two >= 4096")
    if opts.command and shutil.which(opts.command[0]) is None:
        raise UsageError(f"command not found: {opts.command[0]}")
    lib = Libbpf()
    feats = probe(lib.probe_map_type(BPF_MAP_TYPE_RINGBUF))
    provider, reason = choose(opts.provider, feats)
    obj = BpfObject(lib, str(object_path()))
    events: list[Event] = []
    records: list[bytes] = []
    stats = Stats()
    loss_windows: list[tuple[int, int]] = []
    rb: RingBuffer | None = None
    proc = None
    try:
        provider.prepare(obj)
        obj.set_rodata(_config(opts.service_ip, opts.service_port))
        if opts.ringbuf_bytes:
            obj.set_max_entries("events", opts.ringbuf_bytes)
        obj.load()
        attached = provider.attach(obj, netns.path)

        def on_records(batch: list[bytes]) -> None:
            events.extend(kevents.decode_all(batch))
            records.extend(batch)

        rb = RingBuffer(lib, obj.map_fd("events"), on_records)
        attach_s = process_age()
        start_ns, started_at = clock(), time.time()
        topo = snapshot(opts.service_ip, opts.service_port or None)
        run = RunInfo(
            __version__,
            os.uname().release,
            provider.name,
            reason,
            opts.service_ip,
            opts.service_port,
            netns.name,
            0,
            0,
            {},
            tuple(attached),
            round(attach_s, 3),
            started_at,
            start_ns,
            opts.command,
        )
        if sink:
            sink.attached(run)
        if opts.ready_file:
            Path(opts.ready_file).write_text(f"{attach_s:.3f}\n")
        with _StopFlag() as stop:
            proc = _start_command(opts.command)
            deadline = time.monotonic() + opts.duration if opts.duration else None
            cmd_done_at: float | None = None
            last_update, seen_lost, last_check = 0.0, 0, clock()
            while not stop.set:
                rb.poll(opts.poll_ms)
                now = time.monotonic()
                lost, by_point = _lost_counters(obj)
                if lost > seen_lost:
                    loss_windows.append((last_check, clock()))
                    seen_lost = lost
                last_check = clock()
                stats.events, stats.lost, stats.lost_by_point = len(events), lost, by_point
                if sink and now - last_update >= 0.25:
                    sink.update(_analyse(events, opts, topo, loss_windows, clock()), stats)
                    last_update = now
                if deadline is not None and now >= deadline:
                    break
                if proc is not None and cmd_done_at is None and proc.poll() is not None:
                    cmd_done_at = now
                if cmd_done_at is not None and now - cmd_done_at >= opts.grace:
                    break
        status = _stop_command(proc)
        proc = None
        obj.detach_all()
        rb.poll(0)
        end_ns = clock()
        lost, by_point = _lost_counters(obj)
        if lost > seen_lost:
            loss_windows.append((last_check, end_ns))
    finally:
        _stop_command(proc)
        if rb is not None:
            rb.close()
        obj.close()
    if any(topo.namespace(ev.netns) is None for ev in events):
        topo = snapshot(opts.service_ip, opts.service_port or None)
    has_drops = any(ev.point == Point.DROP for ev in events)
    ctx = _context(opts, topo, loss_windows, end_ns, drop_reason_names() if has_drops else {})
    run = RunInfo(
        **{
            **run.__dict__,
            "events": len(events),
            "lost_events": lost,
            "lost_by_point": by_point,
            "command_status": status,
        }
    )
    return TraceResult(run, events, ctx, topo, analyse(events, ctx), records)


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
) -> Context:
    return Context(
        opts.service_ip, opts.service_port, TopologyNames(topo), end_ns, tuple(loss), drops
    )


def _analyse(
    events: list[Event],
    opts: TraceOptions,
    topo: Topology,
    loss: list[tuple[int, int]],
    now_ns: int,
) -> list[tuple[Connection, Diagnosis]]:
    return analyse(events, _context(opts, topo, loss, now_ns, drops={}))
