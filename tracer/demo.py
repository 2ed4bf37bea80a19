"""The main job: reproduce the seed failure in a lab, diagnose it, fix it, show it healthy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.rule import Rule

from tracer.lab import seed
from tracer.present.live import trace_with_view
from tracer.present.report import build
from tracer.trace import TraceOptions, TraceResult

EXPECTED_CAUSE = "bridge-nf-call-iptables-off"


@dataclass(frozen=True)
class DemoOutcome:
    reports: dict[str, Any]
    as_expected: bool
    summary: str


def _curl(lab: seed.SeedLab) -> tuple[str, ...]:
    return (
        "ip",
        "netns",
        "exec",
        lab.pod_a_ns,
        "curl",
        "-sS",
        "-m",
        "3",
        "-o",
        "/dev/null",
        "-w",
        "curl: HTTP %{http_code}\\n",
        f"http://{lab.service_ip}:{lab.service_port}/",
    )


def _trace(lab: seed.SeedLab, live: bool) -> TraceResult:
    opts = TraceOptions(lab.service_ip, lab.service_port, lab.node_ns, command=_curl(lab))
    result, _view = trace_with_view(opts, live, keep_results=True)
    return result


def _verdicts(result: TraceResult) -> list[tuple[str, str | None]]:
    return [(d.verdict, d.brk.cause if d.brk else None) for _c, d in result.results]


def run_demo(proxy_mode: str = "iptables", live: bool = True) -> DemoOutcome:
    """Always removes the lab it built, even when a step fails."""
    console = Console(stderr=True, highlight=False)
    lab = seed.SEED
    seed.up(lab, bridge_nf_call_iptables=0, proxy_mode=proxy_mode)
    try:
        console.print(
            Rule(
                "1. the bug: pod A -> ClusterIP -> pod B on the same bridge, "
                "bridge-nf-call-iptables=0"
            )
        )
        console.print(
            f"lab: {lab.pod_a_ns} {lab.pod_a_ip} -> {lab.service_ip}:"
            f"{lab.service_port} -> {lab.pod_b_ns} {lab.pod_b_ip}:{lab.pod_b_port} "
            f"on {lab.bridge} in {lab.node_ns} ({proxy_mode} rules)"
        )
        broken = _trace(lab, live)
        console.print(Rule(f"2. the fix: net.bridge.bridge-nf-call-iptables=1 in {lab.node_ns}"))
        seed.set_bridge_nf_call_iptables(1, lab)
        console.print(Rule("3. the same curl, traced again"))
        fixed = _trace(lab, live)
    finally:
        removed = seed.down(lab)
    before, after = _verdicts(broken), _verdicts(fixed)
    ok = (
        any(v == ("broken", EXPECTED_CAUSE) for v in before)
        and bool(after)
        and all(v == "ok" for v, _ in after)
    )
    summary = (
        f"demo: before the fix {before}; after {after}; lab removed "
        f"({len(removed)} steps). " + ("As expected." if ok else "NOT as expected.")
    )
    return DemoOutcome(
        {"broken": build(broken.run, broken.results), "fixed": build(fixed.run, fixed.results)},
        ok,
        summary,
    )
