"""A long live trace under steady load: what a node agent costs over time.

scripts/soak traces the seed lab (scripts/seed-lab.sh, its own namespaces node,
poda, podb) while 8 HTTP clients in pod A call the Service, without `-- CMD`, and
stops it with SIGINT as a user would: a soak of 30 minutes (1 in --short). Rows:
connections and events traced per second, the tracer's share of one core, the events
lost, the report's connections against the clients' own count of requests, the
tracer's RSS after 1, 10 and 30 minutes (0.25, 0.5 and 1 in --short), and the time
from SIGINT to the complete report. The soak's own checks (every one ok, the replay's
report the same) are in the rows' detail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tracer.bench.context import Env
from tracer.bench.rows import Row, Target
from tracer.errors import HairtraceError

SECTION = "long live trace"
SOAK = Path(__file__).resolve().parent.parent.parent / "scripts" / "soak"
SIGINT = Target("value", "<", 2.0, "< 2 s")
FLAT = Target("ratio", "<=", 1.2, "<= 1.2x the first")
NONE_LOST = Target("value", "<=", 0, "0")
ALL_COUNTED = Target("ratio", "==", 1.0, "= the clients' count")


def _marks(short: bool) -> tuple[str, str, str]:
    return ("0.25", "0.5", "1") if short else ("1", "10", "30")


def template() -> list[Row]:
    return [
        Row("longrun.connections", SECTION,
            "8 clients through the ClusterIP for 30 min (--short: 1), traced live", "conn/s"),
        Row("longrun.events", SECTION, "events traced per second in that trace", "ev/s"),
        Row("longrun.cpu", SECTION, "tracer CPU over the soak, share of one core", "%"),
        Row("longrun.lost", SECTION, "events lost over the soak", "ev", target=NONE_LOST),
        Row("longrun.counted", SECTION, "connections in the report from the clients' pod",
            "conn", baseline_name="requests the clients counted", target=ALL_COUNTED),
        Row("longrun.rss_first", SECTION, "tracer RSS after 1 min (--short: 0.25)", "MiB"),
        Row("longrun.rss_mid", SECTION, "tracer RSS after 10 min (--short: 0.5)", "MiB",
            baseline_name="RSS after 1 min", target=FLAT),
        Row("longrun.rss_last", SECTION, "tracer RSS after 30 min (--short: 1)", "MiB",
            baseline_name="RSS after 1 min", target=FLAT),
        Row("longrun.sigint", SECTION, "SIGINT -> complete report and exit", "s",
            target=SIGINT),
    ]  # fmt: skip


def measure(env: Env) -> list[Row]:
    first, mid, last = _marks(env.short)
    rows = template()
    argv = [sys.executable, str(SOAK), "--minutes", last, "--marks", f"{first},{mid},{last}",
            "--rss-at", first, "--keep", str(env.workdir / "soak")]  # fmt: skip
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False,
                             timeout=float(last) * 60 + 300)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise HairtraceError(f"scripts/soak did not finish in {last} min + 5") from None
    try:
        out: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise HairtraceError(f"scripts/soak: no result: {res.stderr.strip()[-300:]}") from None
    rss = out["rss_mib_at"]
    detail = {k: out[k] for k in ("client_ok", "client_failed", "report_connections",
                                  "verdicts", "lost_events", "tracer_cpu_share", "checks",
                                  "report_bytes", "session_bytes")}  # fmt: skip
    conns, events, cpu, lost, counted, r1, r2, r3, sig = rows
    return [
        replace(conns, value=out["connections_per_s"], detail=detail),
        replace(events, value=out["events_per_s"],
                detail={"tracer_cpu_share": out["tracer_cpu_share"]}),
        replace(cpu, value=100 * out["tracer_cpu_share"]),
        replace(lost, value=out["lost_events"]),
        replace(counted, value=out["report_connections"],
                baseline=out["client_ok"] + out["client_failed"]),
        replace(r1, value=rss[first]),
        replace(r2, value=rss[mid], baseline=rss[first]),
        replace(r3, value=rss[last], baseline=rss[first]),
        replace(sig, value=out["sigint_to_exit_s"]),
    ]  # fmt: skip
