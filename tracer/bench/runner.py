"""One bench run: every section in turn, each against its baseline, cleaned up whatever happens.

A section that fails yields its rows as n/a with the error, so the table
always has every row. Ctrl-C, SIGTERM and SIGHUP end the run: every process
the bench started is ended and every hb-* namespace removed.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracer.bench import (
    bcc_startup,
    longrun,
    netlab,
    offline,
    overload,
    peers,
    pipeline,
    pktrate,
    startup,
)
from tracer.bench.context import Env, StopRequest
from tracer.bench.procs import Procs, Tools, cpus
from tracer.bench.rows import Row, not_available
from tracer.bench.traffic import Traffic

SCHEMA = "hairtrace/bench@1"


@dataclass(frozen=True)
class Section:
    name: str
    template: Callable[[], list[Row]]
    measure: Callable[[Env], list[Row]]
    needs_lab: bool = True


SECTIONS = (
    Section("pipeline", pipeline.template, pipeline.measure, needs_lab=False),
    Section("longrun", longrun.template, longrun.measure, needs_lab=False),
    Section("pktrate", pktrate.template, pktrate.measure),
    Section("startup", startup.template, startup.measure),
    Section("bcc-startup", bcc_startup.template, bcc_startup.measure),
    Section("offline", offline.template, offline.measure),
    Section("peers", peers.template, peers.measure),
    Section("overload", overload.template, overload.measure),
)


def all_rows() -> list[Row]:
    """Every row a run produces, unmeasured (what the table and JSON always hold)."""
    return [row for s in SECTIONS for row in s.template()]


@contextmanager
def _signals_as_interrupt(stop: StopRequest) -> Iterator[None]:
    """SIGINT, SIGTERM, SIGHUP: KeyboardInterrupt now, and a StopRequest loops check."""

    def interrupt(_sig: int, _frame: object) -> None:
        stop.requested = True
        raise KeyboardInterrupt

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, interrupt) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run_section(section: Section, env: Env, progress: Callable[[str], None]) -> list[Row]:
    progress(f"{section.name} ...")
    t0 = time.monotonic()
    env.stop.check()
    try:
        rows = section.measure(env)
    except Exception as exc:  # noqa: BLE001 - a failed section is n/a rows, the run goes on
        why = f"failed: {exc}".splitlines()[0][:300]
        rows = [not_available(r, why) for r in section.template()]
    finally:
        env.procs.stop_all()
        env.traffic.forget()
    env.stop.check()
    progress(f"{section.name} done in {time.monotonic() - t0:.1f} s")
    expected = [r.id for r in section.template()]
    got = {r.id: r for r in rows}
    return [got.get(i) or not_available(r, "not measured")
            for i, r in zip(expected, section.template(), strict=True)]  # fmt: skip


def run_bench(short: bool, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Measure everything; the JSON document (rows in table order)."""
    t0, started, load0 = time.monotonic(), time.time(), os.getloadavg()
    rows: list[Row] = []
    stop = StopRequest()
    with (
        _signals_as_interrupt(stop),
        Procs() as procs,
        Tools() as tools,
        tempfile.TemporaryDirectory(prefix="hairtrace-bench-") as tmp,
    ):
        avail = cpus()
        env = Env(short, procs, tools, Traffic(procs, tools, avail[0]), Path(tmp), stop)
        for section in SECTIONS:
            if not section.needs_lab:
                rows += _run_section(section, env, progress)
        lab_sections = [s for s in SECTIONS if s.needs_lab]
        try:
            with netlab.Lab():
                for section in lab_sections:
                    rows += _run_section(section, env, progress)
        except Exception as exc:  # noqa: BLE001 - no lab: its sections are n/a
            done = {r.id for r in rows}
            why = f"lab (hb-* namespaces) failed: {exc}".splitlines()[0][:300]
            rows += [not_available(r, why) for s in lab_sections for r in s.template()
                     if r.id not in done]  # fmt: skip
    return {
        "schema": SCHEMA,
        "mode": "short" if short else "full",
        "kernel": os.uname().release,
        "cpus": len(avail),
        "started_at": started,
        "seconds": round(time.monotonic() - t0, 1),
        # 1-minute load average before and after: anything else running skews the rates
        "loadavg": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "rows": [r.to_dict() for r in rows],
    }
