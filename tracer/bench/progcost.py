"""What each of hairtrace's programs costs a packet that is not its business (BPF stats).

The UDP flood outside the filter (hb-a -> hb-b across cni0, not the Service) runs with
hairtrace attached and the kernel's BPF run-time statistics on: BPF_ENABLE_STATS, held
by an fd for the length of the measurement (no sysctl is changed; the kernel stops
counting when the fd closes). Each program's run_time_ns / run_cnt (bpftool prog show)
is the time spent inside it per run, the dispatch around it excluded; the dispatch is
what the pktrate section's floor row measures (the same points, empty programs).

Rows, per kind of program (device tracepoints, netfilter hooks) and object: ns per run
with direct reads (hairtrace.bpf.o), with helper copies (hairtrace-copy.bpf.o, what
kernels before 6.2 load), and runs per packet of the flood (how many programs a packet
of it meets).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from tracer.bench.context import Env
from tracer.bench.pktrate import HairtraceObserver
from tracer.bench.rows import Row
from tracer.errors import HairtraceError
from tracer.kernel.libbpf import Libbpf
from tracer.kernel.objfile import CHECKOUT_BPF, COPY_OBJECT, ENV, OBJECT

SECTION = "program cost (BPF stats, UDP flood outside the filter)"
BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0
DEVICE = ("ht_dev_rx", "ht_dev_tx")  # the device tracepoints the flood fires
OBJECTS = (("direct", OBJECT, "direct reads"), ("copy", COPY_OBJECT, "helper copies"))


def template() -> list[Row]:
    rows = []
    for key, _obj, how in OBJECTS:
        rows += [
            Row(f"progcost.{key}.device_ns", SECTION,
                f"device tracepoint, ns per run ({how})", "ns"),
            Row(f"progcost.{key}.netfilter_ns", SECTION,
                f"netfilter hook, ns per run ({how})", "ns"),
        ]  # fmt: skip
    rows.append(Row("progcost.runs_per_packet", SECTION,
                    "hairtrace programs run per packet of the flood", "runs"))  # fmt: skip
    return rows


@contextmanager
def run_time_stats() -> Iterator[None]:
    """The kernel counts each program's run time while the returned fd is open."""
    attr = ctypes.create_string_buffer(struct.pack("=I", BPF_STATS_RUN_TIME), 8)
    fd = Libbpf().bpf_syscall(BPF_ENABLE_STATS, attr)
    if fd < 0:
        raise HairtraceError(f"BPF_ENABLE_STATS: {os.strerror(-fd)} (needs Linux 5.8+, root)")
    try:
        yield
    finally:
        os.close(fd)


def program_stats() -> dict[str, tuple[int, int]]:
    """hairtrace's loaded programs: name -> (run_time_ns, run_cnt), summed over programs of
    one name (one tracer runs here)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=False, timeout=30)  # fmt: skip
    if out.returncode:
        raise HairtraceError(f"bpftool prog show: {out.stderr.strip() or out.returncode}")
    stats: dict[str, tuple[int, int]] = {}
    for prog in json.loads(out.stdout or "[]"):
        name = prog.get("name", "")
        if name.startswith("ht_"):
            t, n = stats.get(name, (0, 0))
            stats[name] = (t + int(prog.get("run_time_ns", 0)), n + int(prog.get("run_cnt", 0)))
    return stats


def _delta(
    after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    return {k: (t - before.get(k, (0, 0))[0], n - before.get(k, (0, 0))[1])
            for k, (t, n) in after.items()}  # fmt: skip


def per_run(delta: dict[str, tuple[int, int]], names: list[str]) -> tuple[float | None, int]:
    """ns per run over the programs named, and their runs."""
    t = sum(delta.get(n, (0, 0))[0] for n in names)
    runs = sum(delta.get(n, (0, 0))[1] for n in names)
    return (t / runs if runs else None), runs


def _one(env: Env, obj: str) -> tuple[dict[str, tuple[int, int]], int]:
    environ = {**os.environ, ENV: str(CHECKOUT_BPF / "build" / obj)}
    observer = HairtraceObserver(env, 60, environ=environ)
    observer.start()
    try:
        with run_time_stats():
            before = program_stats()
            sample = env.traffic.udp(env.seconds)
            after = program_stats()
    finally:
        observer.stop()
    return _delta(after, before), sample.packets


def measure(env: Env) -> list[Row]:
    by_id = {r.id: r for r in template()}
    out: list[Row] = []
    runs_per_packet: float | None = None
    for key, obj, _how in OBJECTS:
        delta, packets = _one(env, obj)
        nf = sorted(n for n in delta if n.startswith("ht_nf_"))
        for kind, names in (("device", list(DEVICE)), ("netfilter", nf)):
            ns, runs = per_run(delta, names)
            row = by_id[f"progcost.{key}.{kind}_ns"]
            out.append(
                replace(row, value=ns, detail={"runs": runs, "packets": packets, "programs": names})
                if ns is not None
                else replace(row, na="no run counted (stats off, or no packet reached them)")
            )
        if key == "direct" and packets:
            runs_per_packet = sum(n for _t, n in delta.values()) / packets
    last = by_id["progcost.runs_per_packet"]
    out.append(replace(last, value=runs_per_packet) if runs_per_packet
               else replace(last, na="no packet counted"))  # fmt: skip
    return out
