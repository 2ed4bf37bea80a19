"""`hairtrace lab up|down|status`, `demo` and `doctor`: thin fronts over the library."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from tracer.cli_output import fail, write_json
from tracer.errors import HairtraceError


@click.group()
def lab() -> None:
    """Build, inspect and remove the seed lab (network namespaces ht-node, ht-pod-a, ht-pod-b)."""


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
def lab_up(knob: int, proxy_mode: str) -> None:
    """Build the lab: pod A curls ClusterIP 100.67.30.133 served by pod B on bridge cni0."""
    from tracer.lab import seed

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


@lab.command("down")
def lab_down() -> None:
    """Remove everything the lab created."""
    from tracer.lab import seed

    try:
        done = seed.down()
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
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            click.echo(f"{key}: {value}")
    sys.exit(0 if all(st.namespaces.values()) and st.server_alive else 1)


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
