"""Offline analysis: `hairtrace replay BIG.hts --json /dev/null`, its event rate and peak RSS.

The big session is made from a real one: hairtrace records short TCP
connections through the lab's ClusterIP, then tracer.session.synth repeats that
recording with fresh client ports, one copy after another in time, into BIG.
When replay has --stream / --no-stream, BIG is replayed both ways: streaming
(bounded memory) against all events in memory, the baseline ("before").
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tracer.bench import netlab
from tracer.bench.context import Env
from tracer.bench.procs import run
from tracer.bench.rows import Row, Target, not_available
from tracer.bench.tracerun import hairtrace_argv
from tracer.errors import HairtraceError

SECTION = "offline analysis"
CONNECTIONS = 20  # recorded, then repeated
_CLIENT = """\
import socket, sys
for _ in range(int(sys.argv[3])):
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        s.sendall(b"x" * 64)
"""


IN_MEMORY = "--no-stream (all events in memory)"
ANALYSIS = Target("value", ">=", 2e6, ">= 2 M ev/s")
EXPORT = Target("value", ">=", 1e6, ">= 1 M ev/s")
_LOAD = """\
import sys, time
from tracer import session
t = time.monotonic()
df = getattr(session, sys.argv[1])(sys.argv[2])
print(len(df), time.monotonic() - t)
"""


def template() -> list[Row]:
    return [
        Row("offline.replay_rate", SECTION, "hairtrace replay BIG --json /dev/null", "ev/s",
            baseline_name=IN_MEMORY),
        Row("offline.peak_rss", SECTION, "peak RSS of that replay", "MiB",
            baseline_name=IN_MEMORY),
        Row("offline.summary_rate", SECTION,
            "hairtrace replay BIG (diagnosis, summary view; whole command)", "ev/s",
            target=ANALYSIS),
        Row("offline.summary_rss", SECTION, "peak RSS of that replay", "MiB"),
        Row("offline.export_parquet", SECTION, "hairtrace export BIG --format parquet", "ev/s",
            target=EXPORT),
        Row("offline.export_rss", SECTION, "peak RSS of that export", "MiB"),
        Row("offline.load_events", SECTION, "tracer.session.load_events(BIG) (pandas)", "ev/s"),
        Row("offline.load_connections", SECTION,
            "tracer.session.load_connections(BIG) (pandas)", "ev/s"),
    ]  # fmt: skip


@dataclass(frozen=True)
class Replay:
    events: int
    seconds: float
    peak_rss_mib: float
    status: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "seconds": round(self.seconds, 3),
                "peak_rss_mib": round(self.peak_rss_mib, 1), "exit_status": self.status}  # fmt: skip


def synth_module() -> tuple[Any, str | None]:
    try:
        mod = importlib.import_module("tracer.session.synth")
    except ImportError as exc:
        return None, f"no session generator (tracer.session.synth: {exc})"
    if not hasattr(mod, "synthesize"):
        return None, "tracer.session.synth has no synthesize()"
    return mod, None


def record_source(env: Env) -> Path:
    """A recording of CONNECTIONS short TCP connections to the ClusterIP."""
    env.traffic.tcp_sink()
    out = env.workdir / "source.hts"
    client = [sys.executable, "-c", _CLIENT, netlab.SERVICE_IP, str(netlab.SERVICE_PORT),
              str(CONNECTIONS)]  # fmt: skip
    trace = [*hairtrace_argv(), "--svc", netlab.SERVICE_IP, "--netns", netlab.NODE,
             "--no-live", "--record", str(out), "--force"]  # fmt: skip
    # exit 3 (a connection broke) still leaves a whole recording
    run([*trace, "--", *netlab.exec_in(netlab.POD_A, client)], timeout=300, check=False)
    if not out.is_file():
        raise HairtraceError("hairtrace --record wrote no session")
    return out


def has_stream_option() -> bool:
    """Whether this hairtrace's replay chooses between streaming and in-memory analysis."""
    return "--no-stream" in run([*hairtrace_argv(), "replay", "--help"], check=False)


def replay(env: Env, path: Path, events: int, *flags: str) -> Replay:
    """Run the replay as users do, under peakrss (tracer/bench/peakrss.c): wall time, peak RSS.

    flags are replay's own (e.g. --json FILE); its standard output is discarded."""
    argv = [str(env.tools.get("peakrss")), *hairtrace_argv(), "replay", str(path), *flags]
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, timeout=1800, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise HairtraceError(f"hairtrace replay {path.name} did not finish in 30 min") from None
    took = time.monotonic() - t0
    last = (res.stderr.strip().splitlines() or [""])[-1].split()
    if len(last) != 3 or last[0] != "peakrss":
        raise HairtraceError(f"hairtrace replay: no peak RSS: {res.stderr.strip()[-200:]}")
    kib, status = int(last[1]), int(last[2])
    if status not in (0, 3):  # 3: a broken connection in the session, still a full replay
        raise HairtraceError(f"hairtrace replay: exit {status}: {res.stderr.strip()[-200:]}")
    return Replay(events, took, kib / 1024, status)


def _peak(env: Env, argv: list[str], what: str) -> tuple[float, float, str]:
    """argv run under peakrss: (wall seconds, peak RSS MiB, its standard output)."""
    t0 = time.monotonic()
    try:
        res = subprocess.run([str(env.tools.get("peakrss")), *argv], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=1800, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise HairtraceError(f"{what} did not finish in 30 min") from None
    took = time.monotonic() - t0
    last = (res.stderr.strip().splitlines() or [""])[-1].split()
    if len(last) != 3 or last[0] != "peakrss" or int(last[2]) != 0:
        raise HairtraceError(f"{what}: {res.stderr.strip()[-200:]}")
    return took, int(last[1]) / 1024, res.stdout


def _exports(env: Env, big: Path, events: int) -> list[Row]:
    """export --format parquet (whole command), load_events, load_connections."""
    export_row, export_rss_row, events_row, conns_row = template()[4:]
    out = env.workdir / "big.parquet"
    took, rss, _ = _peak(env, [*hairtrace_argv(), "export", str(big), "--format", "parquet",
                               "--out", str(out), "--force"], "hairtrace export")  # fmt: skip
    rows = [replace(export_row, value=round(events / took),
                    detail={"seconds": round(took, 3), "events": events,
                            "file_mib": round(out.stat().st_size / 2**20, 1)}),
            replace(export_rss_row, value=round(rss, 1))]  # fmt: skip
    for row, func in ((events_row, "load_events"), (conns_row, "load_connections")):
        _wall, peak, text = _peak(env, [sys.executable, "-c", _LOAD, func, str(big)], func)
        n, inner = text.split()
        rows.append(replace(row, value=round(events / float(inner)),
                            detail={"rows": int(n), "seconds": round(float(inner), 3),
                                    "peak_rss_mib": round(peak, 1)}))  # fmt: skip
    return rows


def measure(env: Env) -> list[Row]:
    rate_row, rss_row, summary_row, summary_rss_row = template()[:4]
    synth, why = synth_module()
    if synth is None:
        return [not_available(r, why or "") for r in template()]
    source = record_source(env)
    big = env.workdir / "big.hts"
    summary = synth.synthesize([source], big, events=20_000 if env.short else 1_000_000,
                               overwrite=True)  # fmt: skip
    events = int(summary.events)
    both = has_stream_option()
    to_json = ("--json", os.devnull)
    after = replay(env, big, events, *to_json, *(["--stream"] if both else []))
    before = replay(env, big, events, *to_json, "--no-stream") if both else None
    shown = replay(env, big, events)
    detail: dict[str, Any] = {
        "events": events,
        "connections": int(summary.connections),
        "file_mib": round(big.stat().st_size / 2**20, 1),
        "replay": {**after.to_dict(), "flags": "--stream" if both else "(default)"},
        "baseline": before.to_dict() if before else "replay has no --no-stream: no baseline",
        "bytes_per_event": round(after.peak_rss_mib * 2**20 / events, 1),
    }
    return [
        replace(rate_row, value=round(after.rate),
                baseline=round(before.rate) if before else None, detail=detail),
        replace(rss_row, value=round(after.peak_rss_mib, 1),
                baseline=round(before.peak_rss_mib, 1) if before else None, detail=detail),
        replace(summary_row, value=round(shown.rate), detail={"replay": shown.to_dict()}),
        replace(summary_rss_row, value=round(shown.peak_rss_mib, 1)),
        *_exports(env, big, events),
    ]  # fmt: skip
