"""Before and after: the packet-rate rows for another checkout of hairtrace and this one.

Both tracers run in the same hb-* lab, one comparison after the other, each
against the traffic with no tracer (interleaved rounds, tracer.bench.compare);
each row keeps its spread over the rounds and the machine's load while it ran.
The other checkout's hairtrace runs with this venv's interpreter and
PYTHONPATH=CHECKOUT, so its own tracer package and BPF object
(CHECKOUT/bpf/build/hairtrace.bpf.o, built with make -C CHECKOUT/bpf) are used.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracer.bench import load, netlab
from tracer.bench.compare import compare
from tracer.bench.context import Env
from tracer.bench.pktrate import FLOOR_OBJECT, HairtraceObserver
from tracer.bench.procs import Procs, Tools, cpus
from tracer.bench.rows import Row
from tracer.bench.traffic import Sample, Traffic
from tracer.errors import HairtraceError

OBJECT = Path("bpf/build/hairtrace.bpf.o")


@dataclass(frozen=True)
class Variant:
    name: str
    environ: dict[str, str] | None  # None: this checkout, this environment
    extra: tuple[str, ...] = ()
    svc: str = netlab.SERVICE_IP  # --svc (a protocol suffix needs a checkout that knows it)
    floor: bool = False  # empty programs at the same points: only the flood outside the filter


def variants(other: Path) -> list[Variant]:
    if not (other / "tracer" / "cli.py").is_file():
        raise HairtraceError(f"{other}: not a hairtrace checkout (no tracer/cli.py)")
    obj = other / OBJECT
    if not obj.is_file():
        raise HairtraceError(f"{obj} not built: make -C {other / 'bpf'}")
    environ = {**os.environ, "PYTHONPATH": str(other.resolve()),
               "HAIRTRACE_BPF_OBJ": str(obj.resolve())}  # fmt: skip
    return [
        Variant(f"before ({other})", environ),
        Variant("after (this checkout)", None),
        Variant("after, --data-packets 0", None, ("--data-packets", "0")),
        Variant("after, --svc VIP/tcp (TCP only)", None, svc=f"{netlab.SERVICE_IP}/tcp"),
        Variant("floor: empty programs (this checkout)",
                {**os.environ, "HAIRTRACE_BPF_OBJ": str(FLOOR_OBJECT)}, floor=True),
    ]  # fmt: skip


def _observer(env: Env, v: Variant, stop_timeout: float) -> Callable[[], HairtraceObserver]:
    return lambda: HairtraceObserver(env, stop_timeout, v.extra, v.environ, v.svc)


def run_ab(other: Path, rounds: int, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per (variant, traffic): pps with the tracer, without, their ratio."""
    rows = []
    with (
        Procs() as procs,
        Tools() as tools,
        tempfile.TemporaryDirectory(prefix="hairtrace-bench-ab-") as tmp,
        netlab.Lab(),
    ):
        env = Env(False, procs, tools, Traffic(procs, tools, cpus()[0]), Path(tmp))
        kinds: list[tuple[str, Callable[[], Sample], float]] = [
            ("UDP flood outside the filter", lambda: env.traffic.udp(env.seconds), 60),
            ("TCP via the ClusterIP, traced", lambda: env.traffic.tcp(env.seconds), 300),
            (
                "UDP flood via the ClusterIP, traced",
                lambda: env.traffic.udp_service(env.seconds),
                300,
            ),
        ]
        for v in variants(other):
            for kind, traffic, stop_timeout in kinds:
                if v.extra and kind.startswith("UDP"):
                    # outside the filter the budget changes nothing; for the traced flood it
                    # means an event per datagram at every hop: memory without bound (one
                    # open flow holds them all), not a packet-rate measurement
                    continue
                if v.svc.endswith("/tcp") and "traced" in kind and kind.startswith("UDP"):
                    continue  # not traced at all then
                if v.floor and "outside" not in kind:
                    continue  # what the floor measures: dispatch alone, nothing traced
                progress(f"{v.name}: {kind}")
                before = load.sample()
                c = compare(traffic, _observer(env, v, stop_timeout), rounds)
                during = load.between(before, load.sample())
                row = c.row(Row(f"ab.{kind}", "before/after", kind, "pps"))  # medians of rounds
                rows.append({"tracer": v.name, "traffic": kind, "pps": row.value,
                             "no_tracer_pps": row.baseline,
                             "ratio": None if row.ratio is None else round(row.ratio, 3),
                             "spread": row.spread(), "load": during,
                             "observer": c.observed})  # fmt: skip
    return rows
