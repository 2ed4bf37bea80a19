"""The labs' DNS Service: kube-system/kube-dns served by dnsmasq, queried with dig.

A kube-dns-shaped Service (ClusterIP DNS_IP, ports 53/udp "dns" and 53/tcp "dns-tcp")
whose endpoints run dnsmasq on their pod address, port 53, answering a few
cluster.local names from its own records (no upstream, no /etc/hosts, no config
file), so that UDP through a ClusterIP can be reproduced and traced. The client is
Debian's dig, run in a pod netns exactly as an operator would; its output is parsed
into a DigReply. scripts/seed-lab.sh starts dnsmasq with the same options.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tracer.errors import UsageError
from tracer.lab import netns

DNS_IP, DNS_PORT = "100.67.30.140", 53
DNS_NAME = "kube-system/kube-dns"
# (port name, protocol) of kube-dns's Service ports, as in a kubeadm cluster
DNS_PORTS = (("dns", "udp"), ("dns-tcp", "tcp"))
DEFAULT_QUERY = "export.prod.svc.cluster.local"
# name -> address answered by every DNS endpoint
RECORDS = (
    (DEFAULT_QUERY, "100.67.30.133"),
    ("kube-dns.kube-system.svc.cluster.local", DNS_IP),
)
# dig_load pins each query's source port below the kernel's ephemeral range
# (32768-60999), so that it never takes a port the kernel gives another client.
_PINNED_PORTS = (10000, 32000)

_STATUS = re.compile(r"->>HEADER<<-.*\bstatus: ([A-Z]+)")
_A_RECORD = re.compile(r"^\S+\s+\d+\s+IN\s+A\s+(\d{1,3}(?:\.\d{1,3}){3})\s*$")
# dig's own words when no reply came, e.g. ";; communications error to IP#53: timed out",
# ";; Connection to IP#53(IP) for NAME failed: connection refused."
_FAILURE = re.compile(r"^;; (.*(?:error|failed).*?)\.?$", re.MULTILINE)
_FAILURE_KINDS = (
    ("timed out", "timeout"),
    ("connection refused", "connection-refused"),
    ("unreachable", "unreachable"),
)


def dnsmasq_argv(listen_ip: str, log_file: Path, port: int = DNS_PORT) -> list[str]:
    """dnsmasq in the foreground on listen_ip:port (UDP and TCP), answering RECORDS only.

    It stays root (--user=root, no drop to nobody: it runs in a lab pod, and writes its
    log in the lab's root-owned directory), writes no pid file (the lab knows the pid),
    and logs every query to log_file. Other cluster.local names get NXDOMAIN, any other
    name REFUSED.
    """
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        "--group=root",
        "--pid-file=",
        f"--log-facility={log_file}",
        "--log-queries",
        f"--listen-address={listen_ip}",
        "--bind-dynamic",
        f"--port={port}",
        "--local=/cluster.local/",
    ]
    return argv + [f"--host-record={name},{addr}" for name, addr in RECORDS]


@dataclass(frozen=True)
class DigReply:
    """One dig query and what came back."""

    answered: bool  # a DNS reply arrived (whatever its rcode)
    addresses: tuple[str, ...]  # the A records of the answer section
    # the reply's rcode (NOERROR, NXDOMAIN, REFUSED, ...) or, without a reply, lower case:
    # timeout, connection-refused (ICMP port unreachable), unreachable, error
    status: str
    elapsed_s: float
    sport: int | None  # the client's source port, when it was chosen (dig -b)
    pod: str  # the client's netns
    tcp: bool
    error: str = ""  # dig's words when no reply came


def dig_argv(
    name: str,
    server: str,
    *,
    port: int = DNS_PORT,
    tcp: bool = False,
    timeout: float = 2.0,
    sport: int | None = None,
) -> list[str]:
    """``dig @server NAME +time=N +tries=1`` (dig's +time is whole seconds, at least 1)."""
    argv = ["dig", f"@{server}", "-p", str(port), f"+time={max(1, math.ceil(timeout))}", "+tries=1"]
    if tcp:
        argv.append("+tcp")
    if sport is not None:
        argv += ["-b", f"0.0.0.0#{sport}"]
    return [*argv, name]


def parse_dig(output: str) -> tuple[bool, str, tuple[str, ...], str]:
    """(answered, status, addresses, error) from dig's output (stdout and stderr together)."""
    status = _STATUS.search(output)
    if status:
        answer = output.partition(";; ANSWER SECTION:\n")[2].partition("\n\n")[0]
        addrs = tuple(m.group(1) for ln in answer.splitlines() if (m := _A_RECORD.match(ln)))
        return True, status.group(1), addrs, ""
    failure = _FAILURE.search(output)
    error = failure.group(1) if failure else (output.strip().splitlines() or ["no output"])[0]
    kind = next((k for words, k in _FAILURE_KINDS if words in error), "error")
    return False, kind, (), error


def dig(
    ns: str,
    name: str = DEFAULT_QUERY,
    *,
    server: str = DNS_IP,
    port: int = DNS_PORT,
    tcp: bool = False,
    timeout: float = 2.0,
    sport: int | None = None,
) -> DigReply:
    """One dig query from netns ``ns``."""
    argv = dig_argv(name, server, port=port, tcp=tcp, timeout=timeout, sport=sport)
    start = time.monotonic()
    proc = netns.run_in(ns, argv, timeout=timeout + 10, check=False)
    elapsed = time.monotonic() - start
    answered, status, addrs, error = parse_dig(proc.stdout + proc.stderr)
    return DigReply(answered, addrs, status, elapsed, sport, ns, tcp, error)


def dig_many(
    clients: Sequence[str],
    n: int,
    name: str = DEFAULT_QUERY,
    *,
    server: str = DNS_IP,
    tcp: bool = False,
    timeout: float = 2.0,
    parallel: int = 16,
    sport_base: int | None = None,
) -> list[DigReply]:
    """n dig queries spread round-robin over the client netns, up to ``parallel`` at once.

    Query i has source port sport_base + i (default: a random block in 10000-32000, so
    that consecutive loads rarely reuse a conntrack tuple); the replies are in query order.
    """
    if not clients:
        raise UsageError("dig_load needs at least one client pod")
    low, high = _PINNED_PORTS
    if not 0 < n <= high - low:
        raise UsageError(f"dig_load runs 1 to {high - low} queries, not {n}")
    if sport_base is None:
        sport_base = random.randrange(low, high - n + 1)
    if not 0 < sport_base <= 65535 - n:
        raise UsageError(f"source ports {sport_base}+{n} do not fit in 1-65535")

    def one(i: int) -> DigReply:
        return dig(clients[i % len(clients)], name, server=server, tcp=tcp, timeout=timeout,
                   sport=sport_base + i)  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, n))) as pool:
        return list(pool.map(one, range(n)))
