"""Packet-rate overhead of hairtrace on the lab's paths.

Outside the filter: the UDP flood across the bridge (hb-a -> hb-b, not the Service), which hairtrace's
programs see (every device tracepoint and netfilter hook of hb-node fires)
but filter out in the kernel. Traced: one TCP connection of small writes to
the ClusterIP, as hairtrace runs by default (its handshake and first data
packets become events at every hop; later data packets cost a map lookup per
hop: --data-packets) and with --data-packets 0 (every packet becomes events at
every hop). Traced UDP: the same flood sent to the ClusterIP, one flow: its first
datagrams become events at every hop, later ones cost the budget's map lookup per hop
(--data-packets counts datagrams too). All against the same traffic with no tracer.
"""

from __future__ import annotations

import os
from typing import Any

from tracer.bench import netlab
from tracer.bench.compare import compare
from tracer.bench.context import Env
from tracer.bench.rows import Row, Target
from tracer.bench.tracerun import Tracer
from tracer.errors import HairtraceError
from tracer.kernel.objfile import CHECKOUT_BPF, ENV

# bpf/build/floor.bpf.o: hairtrace's programs with every entry point returning at once
FLOOR_OBJECT = CHECKOUT_BPF / "build" / "floor.bpf.o"

SECTION = "packet rate"
UDP = Target("ratio", ">=", 0.98, ">= 0.98 x untraced (< 2% loss)")
TCP = Target("ratio", ">=", 0.80, ">= 0.80 x untraced")
NO_TRACER = "no tracer"


def template() -> list[Row]:
    return [
        Row("pktrate.udp_outside_filter", SECTION,
            "UDP flood outside the filter, hairtrace attached", "pps",
            baseline_name=NO_TRACER, target=UDP),
        Row("pktrate.udp_dispatch_floor", SECTION,
            "UDP flood outside the filter, empty programs at the same points (floor)", "pps",
            baseline_name=NO_TRACER),
        Row("pktrate.tcp_traced", SECTION,
            "TCP via the ClusterIP, traced by hairtrace", "pps",
            baseline_name=NO_TRACER, target=TCP),
        Row("pktrate.tcp_every_packet", SECTION,
            "TCP via the ClusterIP, hairtrace --data-packets 0 (every packet)", "pps",
            baseline_name=NO_TRACER, target=TCP),
        Row("pktrate.udp_traced", SECTION,
            "UDP flood via the ClusterIP, traced (its first datagrams; the rest counted)", "pps",
            baseline_name=NO_TRACER),
    ]  # fmt: skip


class HairtraceObserver:
    """hairtrace --svc VIP --netns hb-node, started and stopped around one sample."""

    def __init__(
        self,
        env: Env,
        stop_timeout: float,
        extra: tuple[str, ...] = (),
        environ: dict[str, str] | None = None,
        svc: str = netlab.SERVICE_IP,
    ) -> None:
        self.env, self.stop_timeout, self.extra, self.environ = env, stop_timeout, extra, environ
        self.svc = svc
        self.tracer: Tracer | None = None

    def start(self) -> None:
        self.tracer = Tracer(self.env.procs, self.env.workdir, self.svc, netlab.NODE,
                             limit=600, extra=self.extra, env=self.environ)  # fmt: skip
        self.tracer.wait_attached()

    def stop(self) -> dict[str, Any]:
        assert self.tracer is not None
        try:
            done = self.tracer.stop(self.stop_timeout)
        except HairtraceError as exc:
            return {"error": str(exc)}
        report = done.report
        return {
            "events": report.get("events"),
            "over_budget_events": report.get("over_budget_events"),
            "lost_events": report.get("lost_events"),
            "connections": len(report.get("connections", [])),
            "exit_status": done.status,
            "sigterm_to_exit_s": round(done.exit_seconds, 3),
        }


def measure(env: Env) -> list[Row]:
    udp_row, floor_row, tcp_row, every_row, udp_traced_row = template()
    secs = env.seconds
    udp = compare(lambda: env.traffic.udp(secs), lambda: HairtraceObserver(env, 60), env.rounds)
    # the dispatch floor: the same loader, provider and attach points, every program empty
    floor_env = {**os.environ, ENV: str(FLOOR_OBJECT)}
    floor = compare(lambda: env.traffic.udp(secs),
                    lambda: HairtraceObserver(env, 60, environ=floor_env), env.rounds)  # fmt: skip
    tcp = compare(lambda: env.traffic.tcp(secs), lambda: HairtraceObserver(env, 180), env.rounds)
    every = compare(lambda: env.traffic.tcp(secs),
                    lambda: HairtraceObserver(env, 300, ("--data-packets", "0")), env.rounds)  # fmt: skip
    udp_svc = compare(lambda: env.traffic.udp_service(secs), lambda: HairtraceObserver(env, 300),
                      env.rounds)  # fmt: skip
    tcp_path = f"hb-a -> {netlab.SERVICE_IP}:{netlab.SERVICE_PORT}, DNAT to hb-b"
    return [
        udp.row(udp_row, traffic="flood.c send: 18-byte UDP, sendmmsg, hb-a -> hb-b via cni0"),
        floor.row(floor_row, traffic=f"as above, {FLOOR_OBJECT.name} ({ENV})"),
        tcp.row(tcp_row, traffic=f"flood.c tcp-send: 64-byte writes, TCP_NODELAY, {tcp_path}"),
        every.row(every_row, traffic=f"as above, every packet traced: {tcp_path}"),
        udp_svc.row(
            udp_traced_row,
            traffic=f"flood.c send: 18-byte UDP, sendmmsg, hb-a -> "
            f"{netlab.SERVICE_IP}:{netlab.UDP_PORT}, DNAT to hb-b",
        ),
    ]
