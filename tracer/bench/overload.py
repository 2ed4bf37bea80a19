"""Overload: hairtrace gets no CPU while traced connections keep coming.

hairtrace is paused (SIGSTOP, as if a busy node gave it no CPU at all) while
short TCP connections to the ClusterIP (flood tcp-conns) keep producing
events, then resumed (SIGCONT) and stopped. The ring buffer fills and
overflows. What counts is what hairtrace does then: the traffic keeps its rate
(against the same traffic with no tracer: the BPF programs never wait for the
reader), every lost event is counted per probe point, connections whose events
were lost are reported `incomplete`, and memory stays small. The numbers come
from hairtrace's own JSON report.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from tracer.bench import netlab
from tracer.bench.context import Env
from tracer.bench.procs import pinned, run
from tracer.bench.rows import Row, Target, not_available
from tracer.bench.tracerun import Tracer
from tracer.bench.traffic import flood_result

SECTION = "overload (tracer paused while traffic runs)"
DRAINING = "hairtrace tracing and draining"
KEEPS_RATE = Target("ratio", ">=", 0.90, ">= 0.90 x draining (never stalls)")


def template() -> list[Row]:
    return [
        Row("overload.conn_rate", SECTION,
            "short TCP connections via the ClusterIP, hairtrace paused", "conn/s",
            baseline_name=DRAINING, target=KEEPS_RATE),
        Row("overload.lost", SECTION, "events lost and counted (of offered)", "ev",
            baseline_name="offered (received + lost)"),
        Row("overload.incomplete", SECTION, "connections reported incomplete", "conn",
            baseline_name="connections in the report"),
        Row("overload.peak_rss", SECTION, "hairtrace peak RSS (VmHWM) after draining", "MiB"),
    ]  # fmt: skip


def _conns(env: Env, seconds: float) -> tuple[float, int]:
    """(connections/s, connections) of one flood tcp-conns run from hb-a."""
    cmd = [str(env.tools.get("flood")), "tcp-conns", netlab.SERVICE_IP,
           str(netlab.SERVICE_PORT), f"{seconds:g}"]  # fmt: skip
    out = run(netlab.exec_in(netlab.POD_A, pinned(env.traffic.cpu, cmd)), timeout=seconds + 60)
    n, took = flood_result("tcp-conns", out)
    return n / took, n


def _first_seen(conn: dict[str, Any], started_at: float) -> float:
    """Wall-clock time of a connection's first packet in the report (0 if none)."""
    ts = [p["ts"] for p in conn.get("packets") or [] if isinstance(p.get("ts"), (int, float))]
    return started_at + min(ts) if ts else 0.0


def measure(env: Env) -> list[Row]:
    rate_row, lost_row, incomplete_row, rss_row = template()
    seconds = 2.0 if env.short else 5.0
    env.traffic.tcp_sink()
    untraced, _ = _conns(env, seconds)
    tracer = Tracer(env.procs, env.workdir, netlab.SERVICE_IP, netlab.NODE, limit=600)
    tracer.wait_attached()
    draining, _ = _conns(env, seconds / 2)
    time.sleep(1.0)  # drained
    mark = time.time()  # connections from here on are the paused run's
    tracer.proc.send_signal(signal.SIGSTOP)
    try:
        rate, conns = _conns(env, seconds)
    finally:
        tracer.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)  # let it drain what the ring buffer kept
    rss = tracer.peak_rss_mib()
    report = tracer.stop(120).report
    events, lost = int(report.get("events") or 0), int(report.get("lost_events") or 0)
    started = float(report.get("started_at") or 0)
    connections: list[dict[str, Any]] = [c for c in report.get("connections") or []
                                         if _first_seen(c, started) >= mark]  # fmt: skip
    verdicts = Counter(str(c.get("verdict")) for c in connections)
    return [
        replace(rate_row, value=rate, baseline=draining,
                detail={"paused_seconds": seconds, "connections": conns,
                        "no_tracer_conn_per_s": round(untraced)}),
        replace(lost_row, value=float(lost), baseline=float(events + lost),
                detail={"lost_by_point": report.get("lost_by_point") or {}, "received": events}),
        replace(incomplete_row, value=float(verdicts["incomplete"]),
                baseline=float(len(connections)), detail={"verdicts": dict(verdicts)}),
        replace(rss_row, value=rss) if rss is not None
        else not_available(rss_row, "hairtrace had exited before it was read"),
    ]  # fmt: skip
