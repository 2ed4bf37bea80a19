"""Traffic through the hb-* lab, measured in packets per second at the receiving pod.

udp(): a sendmmsg flood of 18-byte datagrams hb-a -> hb-b across the bridge
(outside hairtrace's filter); udp_service(): the same flood to the ClusterIP, DNATed to
hb-b (one UDP flow of the Service: its first datagrams traced, the rest counted); tcp(): one connection of 64-byte writes with
TCP_NODELAY from hb-a to the ClusterIP, DNATed to hb-b (traced by hairtrace),
read in 64 KiB blocks (iperf3's server reads in the client's -l size, so with
-l 64 the reader, not the path, set the rate and stalled on a zero window).
Both ends are tracer/bench/flood.c.
Senders run pinned to one CPU, so the per-packet cost of anything attached to
the path shows as fewer packets per second.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from tracer.bench import netlab
from tracer.bench.procs import Procs, Tools, pinned, run
from tracer.errors import HairtraceError


def flood_result(mode: str, out: str) -> tuple[int, float]:
    """(N, seconds) from flood.c's "sent N seconds S errors E" line."""
    try:
        words = out.split()
        return int(words[1]), float(words[3])
    except (IndexError, ValueError):
        raise HairtraceError(f"flood {mode} printed no result: {out.strip()!r}") from None


@dataclass(frozen=True)
class Sample:
    """Packets that reached hb-b's eth0 (both directions for TCP) per second of sending."""

    pps: float
    packets: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"pps": round(self.pps), "packets": self.packets, "seconds": round(self.seconds, 3)}


class Traffic:
    """Senders and receivers in the lab; receivers start on first use and stay up."""

    def __init__(self, procs: Procs, tools: Tools, cpu: int | None) -> None:
        self.procs, self.tools, self.cpu = procs, tools, cpu
        self._udp_sink = False
        self._tcp_sink = False

    def _start_sink(self, mode: str, port: int) -> bool:
        flood = str(self.tools.get("flood"))
        sink = self.procs.start(
            netlab.exec_in(netlab.POD_B, [flood, mode, str(port)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise HairtraceError(f"flood {mode} in {netlab.POD_B} did not start")
        return True

    def _send(self, mode: str, ip: str, port: int, seconds: float, both: bool) -> Sample:
        """Packets into hb-b's eth0 (plus out of it when both) per second of sending."""
        cmd = [str(self.tools.get("flood")), mode, ip, str(port), f"{seconds:g}"]
        rx0, tx0 = netlab.link_packets(netlab.POD_B, "eth0")
        out = run(netlab.exec_in(netlab.POD_A, pinned(self.cpu, cmd)), timeout=seconds + 30)
        rx1, tx1 = netlab.link_packets(netlab.POD_B, "eth0")
        _sent, took = flood_result(mode, out)
        packets = (rx1 - rx0) + ((tx1 - tx0) if both else 0)
        return Sample(packets / took, packets, took)

    def udp(self, seconds: float) -> Sample:
        if not self._udp_sink:
            self._udp_sink = self._start_sink("sink", netlab.UDP_PORT)
        return self._send("send", netlab.POD_B_IP, netlab.UDP_PORT, seconds, both=False)

    def udp_service(self, seconds: float) -> Sample:
        """The same flood to the ClusterIP (DNATed to hb-b): one UDP flow of the Service."""
        if not self._udp_sink:
            self._udp_sink = self._start_sink("sink", netlab.UDP_PORT)
        return self._send("send", netlab.SERVICE_IP, netlab.UDP_PORT, seconds, both=False)

    def forget(self) -> None:
        """The receivers were ended (Procs.stop_all): start them again on next use."""
        self._udp_sink = self._tcp_sink = False

    def tcp_sink(self) -> None:
        """The reader behind the ClusterIP (in hb-b), started once."""
        if not self._tcp_sink:
            self._tcp_sink = self._start_sink("tcp-sink", netlab.SERVICE_PORT)

    def tcp(self, seconds: float) -> Sample:
        self.tcp_sink()
        return self._send("tcp-send", netlab.SERVICE_IP, netlab.SERVICE_PORT, seconds, both=True)
