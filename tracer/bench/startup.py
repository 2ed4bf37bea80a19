"""Start-up and detach of hairtrace as users run it.

attach: `hairtrace --svc VIP --netns hb-node --json - -- true` reports
attach_seconds, process start to every probe attached (interpreter, imports,
BPF load, attach). Its baseline is `hairtrace --version`, the same interpreter
and CLI start with nothing loaded. detach: an idle trace (no events) is sent
SIGTERM; the time until the process has exited (report written, every link
and map released).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import replace

from tracer.bench import netlab
from tracer.bench.context import Env
from tracer.bench.rows import Row, Target
from tracer.bench.tracerun import Tracer, hairtrace_argv
from tracer.errors import HairtraceError

SECTION = "start-up"
ATTACH = Target("value", "<", 0.5, "< 0.5 s")


def template() -> list[Row]:
    return [
        Row("startup.attach", SECTION, "process start -> every probe attached", "s",
            baseline_name="hairtrace --version (start + exit)", target=ATTACH),
        Row("startup.detach", SECTION, "SIGTERM -> process exit (idle trace)", "s"),
    ]  # fmt: skip


def _timed(argv: list[str], timeout: float = 60) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                             stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise HairtraceError(f"{' '.join(argv)} did not finish in {timeout:.0f} s") from None
    return time.monotonic() - t0, res


def measure(env: Env) -> list[Row]:
    attach_row, detach_row = template()
    runs = 1 if env.short else 5
    ht = hairtrace_argv()
    version: list[float] = []
    attach: list[float] = []
    walls: list[float] = []
    for _ in range(runs):
        # the baseline next to each attach: a round's ratio compares neighbours
        version.append(_timed([*ht, "--version"])[0])
        wall, res = _timed([*ht, "--svc", netlab.SERVICE_IP, "--netns", netlab.NODE,
                            "--json", "-", "--", "true"])  # fmt: skip
        if res.returncode != 0:
            raise HairtraceError(f"hairtrace -- true: exit {res.returncode}: "
                                 f"{res.stderr.strip()[-200:]}")  # fmt: skip
        attach.append(float(json.loads(res.stdout)["attach_seconds"]))
        walls.append(wall)
    detach: list[float] = []
    for _ in range(runs):
        tracer = Tracer(env.procs, env.workdir, netlab.SERVICE_IP, netlab.NODE, limit=600)
        tracer.wait_attached()
        detach.append(tracer.stop(60).exit_seconds)
    return [
        replace(attach_row, value=round(statistics.median(attach), 3),
                baseline=round(statistics.median(version), 3),
                rounds=tuple(round(a, 3) for a in attach),
                round_ratios=tuple(a / v for a, v in zip(attach, version, strict=True) if v),
                detail={"attach_seconds": attach, "wall_seconds_true": [round(w, 3) for w in walls],
                        "version_seconds": [round(v, 3) for v in version]}),
        replace(detach_row, value=round(statistics.median(detach), 3),
                rounds=tuple(round(d, 3) for d in detach),
                detail={"sigterm_to_exit_s": [round(d, 3) for d in detach]}),
    ]  # fmt: skip
