"""The bench's network: namespaces hb-node (bridge cni0, a ClusterIP DNAT rule), hb-a, hb-b.

Pods hb-a and hb-b hang off bridge cni0 in hb-node by veth pairs, the way the
CNI bridge plugin wires pods on a node (bridge-nf-call-iptables=1, as
kube-proxy needs). A UDP flood hb-a -> hb-b crosses the bridge; TCP from hb-a
to the bench's ClusterIP is DNATed in hb-node to hb-b. Plain ip / sysctl /
iptables, all inside the hb-* namespaces: the caller's netns is never touched.

The bench uses its own ClusterIP (not the labs' 100.67.30.133), so a bench
run never feeds a tracer that another lab on the machine has running, nor
the reverse.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tracer.errors import HairtraceError
from tracer.lab import netns

NODE, POD_A, POD_B = "hb-node", "hb-a", "hb-b"
NAMESPACES = (POD_A, POD_B, NODE)
PREFIX = "hb-"
BRIDGE, BRIDGE_IP = "cni0", "100.96.77.1"
POD_A_IP, POD_B_IP = "100.96.77.10", "100.96.77.11"
SERVICE_IP, SERVICE_PORT = "100.67.31.133", 5201
UDP_PORT = 9000
LOCK = Path("/run/hairtrace/bench.lock")


def leftovers() -> list[str]:
    """hb-* namespaces that exist now."""
    return [ns for ns in netns.list_netns() if ns.startswith(PREFIX)]


def _remove(ns: str) -> None:
    """Kill what still runs in ns (by pid), then delete it."""
    for pid in netns.pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    netns.delete(ns)


class Lab:
    """Builds the hb-* namespaces on enter, removes them on exit (whatever happened).

    Only one bench at a time: a lock under /run/hairtrace; hb-* namespaces found
    while holding it are leftovers of a killed run and are removed first.
    """

    def __init__(self) -> None:
        self._lock: IO[str] | None = None

    def __enter__(self) -> Self:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK, "w")  # held for the lab's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise HairtraceError(f"another bench is running (lock {LOCK})") from None
        try:
            for ns in leftovers():
                _remove(ns)
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        try:
            for ns in NAMESPACES:
                _remove(ns)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _build(self) -> None:
        netns.add(NODE)
        netns.sysctl_write(NODE, "net.ipv4.ip_forward", 1)
        netns.run_in(NODE, ["ip", "link", "add", BRIDGE, "type", "bridge"])
        netns.run_in(NODE, ["ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE])
        netns.run_in(NODE, ["ip", "link", "set", BRIDGE, "up"])
        key = "net.bridge.bridge-nf-call-iptables"
        if not netns.sysctl_exists(NODE, key):
            raise HairtraceError(f"{key} missing in netns {NODE} (no br_netfilter)")
        netns.sysctl_write(NODE, key, 1)
        self._plug(POD_A, POD_A_IP, "veth-hb-a")
        self._plug(POD_B, POD_B_IP, "veth-hb-b")
        dnat = f"{POD_B_IP}:{SERVICE_PORT}"
        netns.run_in(NODE, ["iptables", "-t", "nat", "-A", "PREROUTING", "-d", f"{SERVICE_IP}/32",
                            "-p", "tcp", "--dport", str(SERVICE_PORT),
                            "-j", "DNAT", "--to-destination", dnat])  # fmt: skip
        # the UDP sink's port through the ClusterIP too (the traced UDP row)
        netns.run_in(NODE, ["iptables", "-t", "nat", "-A", "PREROUTING", "-d", f"{SERVICE_IP}/32",
                            "-p", "udp", "--dport", str(UDP_PORT), "-j", "DNAT",
                            "--to-destination", f"{POD_B_IP}:{UDP_PORT}"])  # fmt: skip

    def _plug(self, ns: str, ip: str, host_if: str) -> None:
        netns.add(ns)
        netns.run_in(NODE, ["ip", "link", "add", host_if, "type", "veth",
                            "peer", "name", "eth0", "netns", ns])  # fmt: skip
        netns.run_in(NODE, ["ip", "link", "set", host_if, "master", BRIDGE])
        netns.run_in(NODE, ["ip", "link", "set", host_if, "up"])
        netns.run_in(ns, ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        netns.run_in(ns, ["ip", "link", "set", "eth0", "up"])
        netns.run_in(ns, ["ip", "route", "add", "default", "via", BRIDGE_IP, "dev", "eth0"])
        # Small writes should stay small packets (a TCP flood of 64-byte writes).
        if netns.sysctl_exists(ns, "net.ipv4.tcp_autocorking"):
            netns.sysctl_write(ns, "net.ipv4.tcp_autocorking", 0)
        # Thousands of short connections a second (the overload section): every
        # port, and TIME_WAIT ports reused, or connect() stalls once the even
        # half of the default range is in TIME_WAIT (about 14 000 connections).
        netns.sysctl_write(ns, "net.ipv4.ip_local_port_range", "1024 65535")
        netns.sysctl_write(ns, "net.ipv4.tcp_tw_reuse", 1)


def exec_in(ns: str, cmd: list[str]) -> list[str]:
    return netns.exec_argv(ns, cmd)


def link_packets(ns: str, dev: str) -> tuple[int, int]:
    """(rx_packets, tx_packets) of dev in ns."""
    out = netns.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["packets"]), int(stats["tx"]["packets"])
