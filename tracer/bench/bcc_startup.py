"""Start-up of the bcc backend: its compile at start-up, then attach.

`hairtrace --backend bcc --svc VIP --netns hb-node --json - -- true` reports
compile_seconds (bcc compiling bpf/hairtrace.bpf.c against the kernel's
headers) and attach_seconds (process start to every probe attached). n/a,
with the reason, where the bcc backend cannot run (no headers for this kernel,
python3-bpfcc not installed).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

from tracer.bench import netlab
from tracer.bench.context import Env
from tracer.bench.rows import Row, not_available
from tracer.bench.startup import SECTION, _timed
from tracer.bench.tracerun import hairtrace_argv
from tracer.errors import HairtraceError
from tracer.kernel.backends import choose_backend


def template() -> list[Row]:
    return [
        Row("startup.bcc", SECTION, "bcc backend: process start -> every probe attached", "s",
            baseline_name="its compile (compile_seconds)"),
    ]  # fmt: skip


def measure(env: Env) -> list[Row]:
    [row] = template()
    try:
        choose_backend("bcc")
    except HairtraceError as exc:
        return [not_available(row, str(exc))]
    runs = 1 if env.short else 3
    attach: list[float] = []
    compile_s: list[float] = []
    for _ in range(runs):
        _wall, res = _timed([*hairtrace_argv(), "--backend", "bcc", "--svc", netlab.SERVICE_IP,
                             "--netns", netlab.NODE, "--json", "-", "--", "true"], timeout=600)  # fmt: skip
        if res.returncode != 0:
            raise HairtraceError(f"hairtrace --backend bcc -- true: exit {res.returncode}: "
                                 f"{res.stderr.strip()[-200:]}")  # fmt: skip
        report = json.loads(res.stdout)
        attach.append(float(report["attach_seconds"]))
        compile_s.append(float(report["compile_seconds"]))
    return [
        replace(row, value=round(statistics.median(attach), 3),
                baseline=round(statistics.median(compile_s), 3),
                rounds=tuple(round(a, 3) for a in attach),
                round_ratios=tuple(a / c for a, c in zip(attach, compile_s, strict=True) if c),
                detail={"attach_seconds": attach, "compile_seconds": compile_s}),
    ]  # fmt: skip
