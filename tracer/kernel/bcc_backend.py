"""The bcc backend: bpf/hairtrace.bpf.c compiled by bcc at start-up, for kernels without BTF.

bcc compiles the same source with -DHT_BCC against the running kernel's
headers (bpf/compat.h maps reads, maps, output and entry points), with the
service as -D macros instead of rodata. Only the kprobe provider exists here:
kprobes on the design's functions plus raw tracepoints for devices and drops,
the same program names and events as CO-RE's kprobe provider. Events go
through a ring buffer (Linux 5.8+, read by the same direct reader) or a perf
buffer before that (or with HAIRTRACE_BCC_PERF=1). bcc is imported only here,
only when this backend runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tracer.errors import HairtraceError
from tracer.events.codec import EVENT_SIZE
from tracer.kernel.backends import BCC_PYTHON, EventReader, Loaded, bcc_missing
from tracer.kernel.features import kfree_skb_has_reason, privileged
from tracer.kernel.libbpf import BPF_MAP_TYPE_RINGBUF, Libbpf
from tracer.kernel.objfile import source_path  # the checkout's bpf/, else the wheel's copy
from tracer.kernel.providers import FunctionProvider
from tracer.kernel.ringbuf import open_reader

HT_PT_MAX = 32
PAGE = 4096
# raw tracepoints of the kprobe provider (the CO-RE build attaches these as tp_btf)
TRACEPOINTS = {"ht_dev_rx": "netif_receive_skb", "ht_dev_tx": "net_dev_start_xmit",
               "ht_drop": "kfree_skb"}  # fmt: skip
PERF_PAGES = 64  # per CPU
PERF_ENV = "HAIRTRACE_BCC_PERF"  # 1 = perf buffer even where the ring buffer exists


def import_bcc() -> Any:
    """bcc's Python module (Debian installs it for /usr/bin/python3, outside the venv)."""
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError:
        if bcc_missing():
            raise HairtraceError(f"backend bcc cannot run here: {bcc_missing()}") from None
        sys.path.append(str(BCC_PYTHON))
        try:
            import bcc
        except ImportError as exc:
            raise HairtraceError(f"cannot import bcc from {BCC_PYTHON}: {exc}") from None
    return bcc


def cflags(
    service_ip: str,
    service_port: int,
    *,
    perf: bool,
    ringbuf_bytes: int | None,
    drop_reason: bool = True,
    data_budget: int = 0,
    protos: int = 0x03,
    source: Path | None = None,
    mask: bytes = b"\xff\xff\xff\xff",
    service_set: bool = False,
) -> list[str]:
    """-D macros for the bcc build: the service (struct ht_config's values, as stored);
    -I the directory of `source` (default: objfile.source_path()) for its headers."""
    source = source or source_path()
    (addr,) = struct.unpack("=I", socket.inet_aton(service_ip))
    (port,) = struct.unpack("=H", service_port.to_bytes(2, "big"))
    flags = [
        "-DHT_BCC",
        f"-I{source.parent}",
        f"-DHT_CFG_SVC_ADDR={addr:#x}U",
        f"-DHT_CFG_SVC_PORT={port:#x}",
        f"-DHT_CFG_SVC_MASK={struct.unpack('=I', mask)[0]:#x}U",
        f"-DHT_CFG_SVC_SET={int(service_set)}",
        f"-DHT_CFG_PROTOS={protos:#x}",
        f"-DHT_CFG_DATA_BUDGET={data_budget}",
        "-Wno-int-conversion",  # integer probe arguments arrive as void * (as in libbpf)
    ]
    if perf:
        flags.append("-DHT_PERF_OUTPUT")
    if not drop_reason:
        flags.append("-DHT_KFREE_SKB_NO_REASON")
    if ringbuf_bytes:
        flags.append(f"-DHT_RINGBUF_PAGES={max(1, ringbuf_bytes // PAGE)}")
    return flags


class BccObject:
    """A bcc module of hairtrace.bpf.c: attach, counters, reader, detach."""

    def __init__(self, source: Path, flags: list[str], perf: bool) -> None:
        bcc = import_bcc()
        self.perf = perf
        self.links: list[tuple[str, str]] = []  # (kind, target)
        t0 = time.monotonic()
        try:
            self.bpf = bcc.BPF(src_file=str(source).encode(), cflags=flags)
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception; clang wrote to stderr
            raise HairtraceError(f"bcc could not compile {source}: {exc}") from None
        self.compile_seconds = time.monotonic() - t0
        self._perf_lost = 0

    def _load(self, prog: str, prog_type: int) -> None:
        try:
            self.bpf.load_func(prog.encode(), prog_type)
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
            raise HairtraceError(f"{prog}: the kernel refused it ({exc})") from None

    def attach_kprobe(self, prog: str, func: str) -> None:
        self._load(prog, self.bpf.KPROBE)
        try:
            self.bpf.attach_kprobe(event=func.encode(), fn_name=prog.encode())
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
            raise HairtraceError(f"attaching {prog} to {func}: {exc}") from None
        self.links.append(("kprobe", func))

    def attach_raw_tracepoint(self, prog: str, tp: str) -> None:
        self._load(prog, self.bpf.RAW_TRACEPOINT)
        try:
            self.bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=prog.encode())
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
            raise HairtraceError(f"attaching {prog} to raw tracepoint {tp}: {exc}") from None
        self.links.append(("raw_tp", tp))

    def counters(self) -> bytes:
        """ht_emitted, ht_lost, ht_over_budget, laid out as the CO-RE object's (struct
        ht_counters, summed over CPUs there)."""
        emitted = [int(v.value) for v in self.bpf["ht_emitted"].values()]
        lost = [int(v.value) for v in self.bpf["ht_lost"].values()]
        # a perf buffer also reports what it could not take; count it once (point 0)
        lost[0] += max(0, self._perf_lost - sum(lost))
        over = [int(v.value) for v in self.bpf["ht_over_budget"].values()]
        return struct.pack(f"<{3 * HT_PT_MAX}Q", *emitted, *lost, *over)

    def buffer_bytes(self) -> int:
        """Bytes the event buffer holds: the ring, or every CPU's perf buffer."""
        if self.perf:
            return PERF_PAGES * PAGE * (os.cpu_count() or 1)
        return int(self.bpf["events"].max_entries)

    def open_reader(self, lib: Libbpf) -> EventReader:
        if self.perf:
            return PerfReader(self)
        # a bcc ring buffer is a BPF ring buffer map: the same readers drain it
        table = self.bpf["events"]
        return open_reader(lib, int(table.map_fd), int(table.max_entries))

    def detach_all(self) -> None:
        while self.links:
            kind, target = self.links.pop()
            with contextlib.suppress(Exception):
                if kind == "kprobe":
                    self.bpf.detach_kprobe(event=target.encode())
                else:
                    self.bpf.detach_raw_tracepoint(tp=target.encode())

    def close(self) -> None:
        self.detach_all()
        with contextlib.suppress(Exception):
            self.bpf.cleanup()


class PerfReader:
    """bcc's perf buffer (kernels before 5.8) behind the ring readers' wait/drain/close."""

    def __init__(
        self, obj: BccObject, record_size: int = EVENT_SIZE, pages: int = PERF_PAGES
    ) -> None:
        self.obj, self.record_size = obj, record_size
        self._pending: list[bytes] = []
        self.events = 0

        def on_event(_cpu: int, data: int, size: int) -> None:
            # perf pads raw samples to 8 bytes with their u32 size: take the record only
            if size >= record_size:
                self._pending.append(ctypes.string_at(data, record_size))

        def on_lost(n: int) -> None:
            obj._perf_lost += n

        obj.bpf["events"].open_perf_buffer(on_event, page_cnt=pages, lost_cb=on_lost)
        self._open = True

    def wait(self, timeout_ms: int) -> bool:
        self.obj.bpf.perf_buffer_poll(timeout_ms)
        return bool(self._pending)

    def drain(self, max_bytes: int | None = None) -> np.ndarray:
        self.obj.bpf.perf_buffer_poll(0)
        batch, self._pending = self._pending, []
        self.events += len(batch)
        if not batch:
            return np.empty((0, self.record_size), dtype=np.uint8)
        raw = np.frombuffer(b"".join(batch), dtype=np.uint8)
        return raw.reshape(len(batch), self.record_size).copy()

    def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(Exception):
                self.obj.bpf["events"].close_perf_buffer()


def _attach(obj: BccObject, skipped: dict[str, str]) -> list[str]:
    attached: list[str] = []
    for prog, tp in TRACEPOINTS.items():
        obj.attach_raw_tracepoint(prog, tp)
        attached.append(prog)
    functions = FunctionProvider("kprobe")
    programs = functions.candidates()
    skipped.update(functions.skipped)
    for prog, func in programs.items():
        try:
            obj.attach_kprobe(prog, func)
        except HairtraceError as exc:
            skipped[func] = str(exc).splitlines()[0][:240]
            continue
        attached.append(prog)
    return attached


def load(
    service_ip: str,
    service_port: int,
    ringbuf_bytes: int | None,
    data_budget: int,
    reason: str,
    protos: int = 0x03,
    mask: bytes = b"\xff\xff\xff\xff",
    services: tuple[str, ...] = (),
) -> Loaded:
    """Compile and load with bcc; attach happens through the returned Loaded."""
    why = privileged()
    if why:
        raise HairtraceError(why)
    if not Path("/sys/bus/event_source/devices/kprobe").exists():
        raise HairtraceError("backend bcc cannot run here: kernel built without CONFIG_KPROBES")
    lib = Libbpf()
    forced = os.environ.get(PERF_ENV, "") == "1"
    has_ringbuf = lib.probe_map_type(BPF_MAP_TYPE_RINGBUF)
    perf = forced or not has_ringbuf
    source = source_path()
    flags = cflags(service_ip, service_port, perf=perf, ringbuf_bytes=ringbuf_bytes,
                   drop_reason=kfree_skb_has_reason(), data_budget=data_budget,
                   protos=protos, source=source, mask=mask,
                   service_set=bool(services))  # fmt: skip
    obj = BccObject(source, flags, perf)
    table = obj.bpf["services"]
    for ip in services:  # a range's Service addresses (network byte order, as the kernel's)
        table[table.Key(struct.unpack("=I", socket.inet_aton(ip))[0])] = table.Leaf(1)
    output = "perf buffer" if perf else "ring buffer"
    if perf:
        output += f" ({PERF_ENV}=1)" if forced else " (no BPF ring buffer: Linux before 5.8)"
    skipped: dict[str, str] = {}
    return Loaded(
        backend="bcc",
        backend_reason=f"{reason}; compiled in {obj.compile_seconds:.2f}s; {output}",
        provider="kprobe",
        provider_reason="kprobe (the bcc backend's provider: kprobes and raw tracepoints)",
        obj=obj,
        attach=lambda _netns: _attach(obj, skipped),
        open_reader=lambda: obj.open_reader(lib),
        ring_bytes=obj.buffer_bytes(),
        counters=obj.counters,
        skipped=skipped,
        compile_seconds=round(obj.compile_seconds, 3),
    )
