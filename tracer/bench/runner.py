"""One bench run: every section in turn, each against its baseline, cleaned up whatever happens.

A section that fails yields its rows as n/a with the error, so the table
always has every row (of the sections run: `only` picks some). Each row carries
the machine's load while its section ran (tracer.bench.load). Ctrl-C, SIGTERM
and SIGHUP end the run: every process the bench started is ended, every hb-*
namespace removed, and tracefs unmounted if the bench mounted it (peers).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tracer.bench import (
    bcc_startup,
    load,
    longrun,
    netlab,
    offline,
    overload,
    peers,
    pipeline,
    pktrate,
    progcost,
    startup,
)
from tracer.bench.context import Env, StopRequest
from tracer.bench.procs import Procs, Tools, cpus
from tracer.bench.rows import Row, not_available
from tracer.bench.traffic import Traffic
from tracer.errors import HairtraceError

SCHEMA = "hairtrace/bench@2"


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
    Section("progcost", progcost.template, progcost.measure),
    Section("startup", startup.template, startup.measure),
    Section("bcc-startup", bcc_startup.template, bcc_startup.measure),
    Section("offline", offline.template, offline.measure),
    Section("peers", peers.template, peers.measure),
    Section("overload", overload.template, overload.measure),
)


def all_rows(only: Collection[str] | None = None) -> list[Row]:
    """Every row a run produces, unmeasured (what the table and JSON always hold)."""
    return [row for s in _selected(only) for row in s.template()]


def section_names() -> list[str]:
    return [s.name for s in SECTIONS]


def _selected(only: Collection[str] | None) -> list[Section]:
    if only is None:
        return list(SECTIONS)
    unknown = set(only) - set(section_names())
    if unknown:
        raise HairtraceError(f"no bench section {', '.join(sorted(unknown))} "
                             f"(sections: {', '.join(section_names())})")  # fmt: skip
    return [s for s in SECTIONS if s.name in only]


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
    before = load.sample()
    try:
        rows = section.measure(env)
    except Exception as exc:  # noqa: BLE001 - a failed section is n/a rows, the run goes on
        why = f"failed: {exc}".splitlines()[0][:300]
        rows = [not_available(r, why) for r in section.template()]
    finally:
        env.procs.stop_all()
        env.traffic.forget()
    during = load.between(before, load.sample())  # after stop_all: its processes are reaped
    env.stop.check()
    progress(f"{section.name} done in {time.monotonic() - t0:.1f} s ({load.describe(during)})")
    expected = [r.id for r in section.template()]
    got = {r.id: r for r in rows}
    return [replace(got.get(i) or not_available(r, "not measured"), load=during)
            for i, r in zip(expected, section.template(), strict=True)]  # fmt: skip


def run_bench(
    short: bool,
    progress: Callable[[str], None] = lambda _m: None,
    only: Collection[str] | None = None,
) -> dict[str, Any]:
    """Measure everything (or the sections in `only`); the JSON document (rows in table order)."""
    sections = _selected(only)
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
        for section in sections:
            if not section.needs_lab:
                rows += _run_section(section, env, progress)
        lab_sections = [s for s in sections if s.needs_lab]
        try:
            with netlab.Lab() if lab_sections else nullcontext():
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
        "sections": [s.name for s in sections],
        "kernel": os.uname().release,
        "cpus": len(avail),
        "started_at": started,
        "seconds": round(time.monotonic() - t0, 1),
        # 1-minute load average before and after: anything else running skews the rates
        "loadavg": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "rows": [r.to_dict() for r in rows],
    }
