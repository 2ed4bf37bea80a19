"""`hairtrace lab up|down|status`, `demo` and `doctor`: thin fronts over the library."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict
from typing import Any

import click

from tracer.cli_output import check_writable, fail, write_json
from tracer.errors import HairtraceError


@click.group()
def lab() -> None:
    """Build, inspect and remove the labs: the seed lab (network namespaces ht-node, ht-pod-a,
    ht-pod-b) and, with --fault or --two-node, the cluster lab (ht-n1, ht-n1-a, ...)."""


@lab.command("up")
@click.option(
    "--bridge-nf-call-iptables",
    "knob",
    type=click.IntRange(0, 1),
    default=0,
    show_default=True,
    help="The sysctl in the node netns (0 reproduces the bug).",
)
@click.option(
    "--proxy-mode",
    type=click.Choice(["iptables", "nftables"]),
    default="iptables",
    show_default=True,
    help="Shape of the kube-proxy NAT rules.",
)
@click.option(
    "--fault",
    metavar="NAME",
    help="Build the cluster lab with this fault on top of the healthy one (none = healthy).",
)
@click.option("--two-node", is_flag=True, help="Cluster lab with two nodes joined by VXLAN.")
@click.option(
    "--runtime",
    type=click.Choice(["containerd"]),
    help="The seed case with pods made by a real container runtime (its CRI), in netns ht-rt.",
)
@click.option("--list-faults", is_flag=True, help="List the faults and their cause codes.")
def lab_up(
    knob: int,
    proxy_mode: str,
    fault: str | None,
    two_node: bool,
    runtime: str | None,
    list_faults: bool,
) -> None:
    """Build a lab. Without --fault or --two-node: the seed lab, where pod A curls ClusterIP
    100.67.30.133 served by pod B on bridge cni0."""
    from tracer.lab import seed

    if list_faults:
        _list_faults()
        return
    if fault is not None or two_node:
        _cluster_up(fault or "none", proxy_mode, 2 if two_node else None)
        return
    if runtime is not None:
        _runtime_up(knob)
        return

    try:
        state = seed.up(bridge_nf_call_iptables=knob, proxy_mode=proxy_mode)
    except HairtraceError as exc:
        fail(exc)
    lab_ = state.lab
    click.echo(
        f"lab up: node {lab_.node_ns}, pods {lab_.pod_a_ns} ({lab_.pod_a_ip}) and "
        f"{lab_.pod_b_ns} ({lab_.pod_b_ip}), service {lab_.service_ip}:"
        f"{lab_.service_port}, bridge-nf-call-iptables={knob}, {proxy_mode} rules"
    )
    click.echo(
        f"try: sudo hairtrace --svc {lab_.service_ip} --netns {lab_.node_ns} -- "
        f"ip netns exec {lab_.pod_a_ns} curl -m 3 http://{lab_.service_ip}/"
    )


def _runtime_up(knob: int) -> None:
    from tracer.lab import runtime

    try:
        lab_ = runtime.up(knob)
    except HairtraceError as exc:
        fail(exc)
    pods = ", ".join(f"{p.pod} ({p.ip}, netns {p.netns})" for p in lab_.pods)
    click.echo(
        f"lab up: runtime {lab_.runtime} in netns {lab_.node_ns}, pods {pods}, service "
        f"prod/export 100.67.30.133:80, bridge-nf-call-iptables={knob}"
    )
    click.echo(
        f"try: sudo hairtrace --svc prod/export --netns {lab_.node_ns} -- "
        f"ip netns exec {lab_.client.netns} curl -m 3 http://100.67.30.133/"
    )


def _list_faults() -> None:
    from tracer.lab.faults import FAULTS

    width = max(len(n) for n in FAULTS)
    for f in FAULTS.values():
        where = "VM" if f.needs else "host"
        code = f.cause or "ok"
        click.echo(f"{f.name:<{width}}  {code:<28} {where:<4}  {f.summary}")


def _cluster_up(name: str, proxy_mode: str, nodes: int | None) -> None:
    from tracer.lab import cluster, faults

    try:
        state = faults.up(name, proxy_mode=proxy_mode, nodes=nodes)
    except HairtraceError as exc:
        fail(exc)
    spec = state.spec
    eps = ", ".join(str(e) for e in spec.endpoints) or "none"
    click.echo(
        f"lab up: fault {name}, {spec.nodes} node(s) {', '.join(spec.namespaces[: spec.nodes])}, "
        f"client {spec.client.ns} ({spec.client.ip}), service {cluster.SERVICE_IP}:"
        f"{cluster.SERVICE_PORT} -> {eps}, {proxy_mode} rules"
    )
    for note in state.fault_notes:
        click.echo(f"fault: {note}")
    click.echo(
        f"try: hairtrace --svc {cluster.SERVICE_IP} --netns {spec.node_ns(1)} -- "
        f"ip netns exec {spec.client.ns} curl -m 3 {spec.service_url}"
    )


@lab.command("down")
def lab_down() -> None:
    """Remove everything the labs created."""
    from tracer.lab import cluster, runtime, seed

    try:
        done = seed.down() + cluster.down() + runtime.down()
    except HairtraceError as exc:
        fail(exc)
    click.echo("lab down: " + (", ".join(done) if done else "nothing to remove"))


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lab_status(as_json: bool) -> None:
    """What exists of the lab. Exit status 0 when it is up, 1 when (partly) absent."""
    from tracer.lab import seed

    try:
        st = seed.status()
    except HairtraceError as exc:
        fail(exc)
    data = asdict(st)
    data["cluster"] = _cluster_status()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            click.echo(f"{key}: {value}")
    sys.exit(0 if all(st.namespaces.values()) and st.server_alive else 1)


@lab.command("load")
@click.option("-n", "--connections", type=click.IntRange(1, 5000), default=300, show_default=True)
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Every connection as JSON.")
@click.option("--dns", is_flag=True, help="DNS queries (dig) to kube-dns instead of HTTP.")
@click.option("--tcp", is_flag=True, help="With --dns: over TCP.")
@click.option(
    "--all-pods",
    is_flag=True,
    help="With --dns: from every pod of node 1 (the client's node), round-robin.",
)
def lab_load(
    connections: int, timeout: float, as_json: bool, dns: bool, tcp: bool, all_pods: bool
) -> None:
    """Open N concurrent connections from the cluster lab's client pod to the Service and
    say which backend served each (--dns: N DNS queries to 100.67.30.140:53, 16 at a
    time, query i from source port BASE+i). Exit status 1 if any failed."""
    from tracer.lab import cluster

    try:
        state = cluster.load_state()
        if state is None:
            raise HairtraceError("no cluster lab: run hairtrace lab up --fault NAME first")
        if dns:
            spec = state.spec
            pods = tuple(p for p in spec.pods if p.node == 1) if all_pods else None
            replies = cluster.dig_load(spec, connections, pods, tcp=tcp,
                                       timeout=min(timeout, 5.0))  # fmt: skip
        else:
            results = cluster.load(state.spec, connections, timeout)
    except HairtraceError as exc:
        fail(exc)
    if dns:
        _dns_load_output(replies, as_json)
        return
    failed = [r for r in results if r["status"] != 200]
    if as_json:
        click.echo(json.dumps({"connections": results}, indent=1))
    else:
        per = Counter(str(r["backend"]) for r in results if r["status"] == 200)
        click.echo(
            f"{len(results) - len(failed)}/{len(results)} ok; by backend: "
            + (", ".join(f"{b} {n}" for b, n in sorted(per.items())) or "none")
        )
        for line in failure_lines(failed):
            click.echo(line)
    sys.exit(1 if failed else 0)


def _dns_load_output(replies: list[Any], as_json: bool) -> None:
    from dataclasses import asdict

    failed = [r for r in replies if not r.answered]
    if as_json:
        click.echo(json.dumps({"queries": [asdict(r) for r in replies]}, indent=1))
    else:
        click.echo(f"{len(replies) - len(failed)}/{len(replies)} answered")
        tally = Counter(r.status for r in failed)
        if failed:
            click.echo(
                f"{len(failed)} failed: " + "; ".join(f"{n} {w}" for w, n in tally.most_common())
            )
    sys.exit(1 if failed else 0)


def failure_lines(failed: list[dict[str, Any]]) -> list[str]:
    """Every failed connection of `lab load`, one line each, after a tally by reason."""

    def why(r: dict[str, Any]) -> str:
        return str(r["error"] or f"HTTP status {r['status']}")

    tally = Counter(why(r) for r in failed)
    lines = [f"{len(failed)} failed: " + "; ".join(f"{n} {w}" for w, n in tally.most_common())]
    for r in failed:
        port = f"local port {r['sport']}" if r["sport"] else "local port unknown"
        lines.append(f"failed ({port}): {why(r)}")
    return lines if failed else []


def _cluster_status() -> dict[str, object] | None:
    """The cluster lab's fault, nodes, endpoints and which of its namespaces exist; None if
    there is none."""
    from tracer.lab import cluster, netns

    try:
        state = cluster.load_state()
    except HairtraceError as exc:
        return {"error": str(exc)}
    if state is None:
        return None
    spec = state.spec
    return {
        "fault": spec.fault,
        "nodes": spec.nodes,
        "proxy_mode": spec.proxy_mode,
        "endpoints": [str(e) for e in spec.endpoints],
        "namespaces": {ns: netns.exists(ns) for ns in spec.namespaces},
        "fault_notes": list(state.fault_notes),
    }


@click.command()
@click.option("--json", "json_dest", metavar="FILE", help="Write both reports as one JSON file.")
@click.option(
    "--proxy-mode",
    type=click.Choice(["iptables", "nftables"]),
    default="iptables",
    show_default=True,
)
def demo(json_dest: str | None, proxy_mode: str) -> None:
    """Build the lab, reproduce the bug, trace it, apply the fix, trace again, remove the lab."""
    from tracer.demo import run_demo

    try:
        if json_dest:
            check_writable(json_dest, "--json")  # before the demo, not after it
        outcome = run_demo(proxy_mode=proxy_mode, live=sys.stderr.isatty())
        if json_dest:
            write_json(outcome.reports, json_dest)
    except HairtraceError as exc:
        fail(exc)
    click.echo(outcome.summary, err=True)
    sys.exit(0 if outcome.as_expected else 1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """What this kernel offers (BTF, fentry, kprobes, ring buffer, netfilter links, traceable
    functions), the path state of each network namespace, and the provider auto would use."""
    from tracer.doctor import diagnose_host, render_text

    try:
        data = diagnose_host()
    except HairtraceError as exc:
        fail(exc)
    click.echo(json.dumps(data, indent=2) if as_json else render_text(data))


def register(main: click.Group) -> None:
    """Attach the lab commands to the main group (kept apart so the trace path stays small)."""
    main.add_command(lab)
    main.add_command(demo)
    main.add_command(doctor)
