"""The machine's load while a section runs: what else used the CPUs, beside the bench.

A sample holds the 1-minute load average, the CPU time all processes used
(/proc/stat user + nice + system), the time the hypervisor gave other guests
(steal) and the CPU time of the bench's own processes (this one and every child
it has reaped: getrusage). Between two samples, "others" is the machine's busy
time minus the bench's: the other processes that competed with the measurement,
in CPUs (0.5: half a CPU busy on average). Kernel threads are counted apart
(ksoftirqd, kworkers: mostly the lab's own packets when the softirq load is
high), and interrupt and softirq time is left out for the same reason.
Children still running at a sample are not counted yet, so the runner samples
after a section's processes are ended; processes a child left behind (a lab's
servers) count as others.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    loadavg: float
    busy_s: float | None  # user + nice + system of all CPUs, seconds (None: no /proc/stat)
    steal_s: float | None
    own_s: float  # user + system of this process and its reaped children
    kthreads_s: float | None = None  # user + system of all kernel threads


def _proc_stat() -> tuple[float, float] | None:
    """(user + nice + system, steal) of all CPUs in seconds, from /proc/stat's cpu line."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(f) for f in fields[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, steal = ticks[0], ticks[1], ticks[2], ticks[7]
    return (user + nice + system) / hz, steal / hz


_PF_KTHREAD = 0x00200000


def _kernel_threads() -> float | None:
    """CPU seconds kernel threads have used (PF_KTHREAD in /proc/PID/stat's flags)."""
    total = 0
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                rest = fh.read().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if len(rest) > 12 and int(rest[6]) & _PF_KTHREAD:
            total += int(rest[11]) + int(rest[12])
    return total / os.sysconf("SC_CLK_TCK")


def sample() -> Sample:
    stat = _proc_stat()
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        own += ru.ru_utime + ru.ru_stime
    return Sample(
        at=time.monotonic(),
        loadavg=os.getloadavg()[0],
        busy_s=None if stat is None else stat[0],
        steal_s=None if stat is None else stat[1],
        own_s=own,
        kthreads_s=_kernel_threads(),
    )


def between(a: Sample, b: Sample) -> dict[str, Any]:
    """The load from a to b: load average at both ends, others' and steal CPU, seconds."""
    secs = max(b.at - a.at, 1e-9)
    out: dict[str, Any] = {
        "seconds": round(secs, 1),
        "loadavg": [round(a.loadavg, 2), round(b.loadavg, 2)],
        "bench_cpu": round((b.own_s - a.own_s) / secs, 2),
        "others_cpu": None,
        "kernel_threads_cpu": None,
        "steal_cpu": None,
    }
    kthreads = 0.0
    if a.kthreads_s is not None and b.kthreads_s is not None:
        kthreads = b.kthreads_s - a.kthreads_s
        out["kernel_threads_cpu"] = round(kthreads / secs, 2)
    if a.busy_s is not None and b.busy_s is not None:
        others = (b.busy_s - a.busy_s) - (b.own_s - a.own_s) - kthreads
        out["others_cpu"] = round(max(others, 0.0) / secs, 2)
    if a.steal_s is not None and b.steal_s is not None:
        out["steal_cpu"] = round((b.steal_s - a.steal_s) / secs, 2)
    return out


def merge(loads: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One load over consecutive periods (sections shown under one heading)."""
    if not loads:
        return None
    secs = sum(x["seconds"] for x in loads) or 1e-9

    def avg(key: str) -> float | None:
        if any(x[key] is None for x in loads):
            return None
        return round(sum(x[key] * x["seconds"] for x in loads) / secs, 2)

    return {
        "seconds": round(secs, 1),
        "loadavg": [loads[0]["loadavg"][0], loads[-1]["loadavg"][1]],
        "bench_cpu": avg("bench_cpu"),
        "others_cpu": avg("others_cpu"),
        "kernel_threads_cpu": avg("kernel_threads_cpu"),
        "steal_cpu": avg("steal_cpu"),
    }


def describe(load: dict[str, Any]) -> str:
    """'load average 1.02 -> 1.10, other processes 0.05 CPU, kernel threads 0.20 CPU'."""
    before, after = load["loadavg"]
    text = f"load average {before:.2f} -> {after:.2f}"
    if load.get("others_cpu") is not None:
        text += f", other processes {load['others_cpu']:.2f} CPU"
    if load.get("kernel_threads_cpu"):
        text += f", kernel threads {load['kernel_threads_cpu']:.2f} CPU"
    if load.get("steal_cpu"):
        text += f", stolen by the hypervisor {load['steal_cpu']:.2f} CPU"
    return text
