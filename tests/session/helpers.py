"""Sessions built from the recorded fixtures (tests/fixtures/seed-*.json)."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.loader import Fixture, load
from tracer import __version__
from tracer.present.report import RunInfo
from tracer.session import SessionFooter, SessionHeader, SessionWriter
from tracer.session.replay import footer_from_trace, header_from_trace
from tracer.topology import Interface, Namespace, Topology

DROP_REASONS = {3: "NO_SOCKET", 2: "NOT_SPECIFIED", 12: "NETFILTER_DROP"}


def records(fx: Fixture) -> list[bytes]:
    return [bytes.fromhex(r) for r in fx.raw["records"]]


def fixture_run(fx: Fixture) -> RunInfo:
    """The RunInfo a live trace of this fixture would have had."""
    raw = fx.raw
    return RunInfo(
        __version__, raw["kernel"], raw["provider"], "BPF netfilter hooks (Linux 6.4+)",
        raw["service_ip"], raw["service_port"], "node", events=len(raw["records"]),
        attached=("netif_receive_skb", "net_dev_start_xmit", "kfree_skb"),
        skipped={"br_handle_frame": "fentry refused"}, attach_seconds=0.412,
        started_at=1795724539.5, start_ns=raw["start_ns"],
        command=("curl", "-m", "3", "http://100.67.30.133/"), command_status=28,
    )  # fmt: skip


def fixture_header(fx: Fixture, topology: Topology | None = None) -> SessionHeader:
    return header_from_trace(
        fixture_run(fx), topology or fx.topology, DROP_REASONS, hostname="node-1"
    )


def fixture_footer(fx: Fixture, topology: Topology | None = None) -> SessionFooter:
    return footer_from_trace(
        fixture_run(fx),
        end_ns=fx.raw["end_ns"],
        loss_windows=[tuple(w) for w in fx.raw["loss_windows"]],
        topology=topology,
    )


def batches(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def write_fixture(
    name: str, path: Path, *, batch: int = 10, footer: bool = True, tiny: bool = False
) -> Fixture:
    """Record fixture `name` as a session at path, `batch` records per chunk."""
    fx = load(name)
    header = fixture_header(fx, tiny_topology() if tiny else None)
    with SessionWriter(path, header) as w:
        for b in batches(records(fx), batch):
            w.write_records(b)
        if footer:
            w.close(fixture_footer(fx))
    return fx


def tiny_topology() -> Topology:
    """A one-namespace snapshot, so that events are most of a small session's bytes."""
    eth = Interface(2, "eth0", addresses=("192.0.2.2/24",), up=True)
    return Topology((Namespace(4026531840, "node", (eth,), {"net.ipv4.ip_forward": "1"}),), 1.5)
