"""Which Service addresses and ports kube-proxy's rules on a node define.

Pure text processing of `iptables-save` (nat and filter tables) and `nft list ruleset`
output, no system access. kube-proxy writes, per Service port:
  - iptables mode: `-A KUBE-SERVICES -d IP/32 -p tcp ... --dport PORT -j KUBE-SVC-...`
    in the nat table, or, when the Service has no endpoints, the same match with
    `-j REJECT` in the filter table's KUBE-SERVICES;
  - nftables mode (table `ip kube-proxy`): an element `IP . tcp . PORT : goto service-...`
    of map `service-ips`, or of `no-endpoint-services` without endpoints.
So "no such Service" is said only when kube-proxy's rules are there (a KUBE-SERVICES chain
or a kube-proxy nft table) and none of them names the address or port; without them
(another proxy, IPVS, no rules readable) nothing is known and nothing is said.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from typing import Any

_NFT_ELEMENT = re.compile(
    r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})\s+\.\s+(tcp|udp|sctp)\s+\.\s+(\d{1,5})(?![\d.])"
)
_NFT_KUBE_TABLE = re.compile(r"^\s*table\s+ip\s+kube-proxy\b", re.MULTILINE)


def kube_services(ipt_text: str, nft_text: str) -> dict[str, frozenset[str]] | None:
    """Service address -> its ports ("80/tcp") in kube-proxy's rules; None when the text
    holds no kube-proxy rules at all (so nothing can be said about a missing Service)."""
    found: dict[str, set[str]] = {}
    kube = False
    for line in ipt_text.splitlines():
        if line.startswith(":KUBE-SERVICES "):
            kube = True
        if not line.startswith("-A KUBE-SERVICES "):
            continue
        kube = True
        hit = _iptables_portal(line)
        if hit is not None:
            found.setdefault(hit[0], set()).add(hit[1])
    for table in _NFT_KUBE_TABLE.finditer(nft_text):
        kube = True
        body = _nft_table_body(nft_text, table.start())
        for addr, proto, port in _NFT_ELEMENT.findall(body):
            found.setdefault(addr, set()).add(f"{int(port)}/{proto}")
    if not kube:
        return None
    return {addr: frozenset(ports) for addr, ports in found.items()}


def _iptables_portal(line: str) -> tuple[str, str] | None:
    """(address, "PORT/PROTO") of a KUBE-SERVICES rule matching one destination and port."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        tokens = line.split()
    addr = proto = port = None
    for i, tok in enumerate(tokens[:-1]):
        negated = i > 0 and tokens[i - 1] == "!"
        nxt = tokens[i + 1]
        if tok in ("-d", "--destination") and not negated:
            addr = nxt.removesuffix("/32")
        elif tok in ("-p", "--protocol") and not negated:
            proto = nxt
        elif tok in ("--dport", "--destination-port") and not negated and nxt.isdigit():
            port = int(nxt)
    if addr is None or proto is None or port is None or "/" in addr:
        return None
    return addr, f"{port}/{proto}"


def _nft_table_body(text: str, start: int) -> str:
    """The text of the nft table starting at start, up to its closing brace."""
    depth = 0
    for i in range(text.find("{", start), len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return text[start:]


def nearest(services: dict[str, frozenset[str]], ip: str, limit: int = 3) -> tuple[str, ...]:
    """The Service addresses numerically closest to ip (for "did you mean")."""
    want = int(ipaddress.ip_address(ip))
    addrs = sorted(services, key=lambda a: (abs(int(ipaddress.ip_address(a)) - want), a))
    return tuple(addrs[:limit])


def port_label(port: int, proto: str = "tcp") -> str:
    """How a Service port is written in service_ports: "80/tcp"."""
    return f"{port}/{proto}"


def service_warning(
    ip: str,
    port: int,
    ports: tuple[str, ...] | None,
    near: tuple[str, ...],
    netns: str,
    protocols: tuple[str, ...] = ("tcp",),
) -> str | None:
    """What to tell the user at start when kube-proxy's rules in the node netns do not have
    the Service they asked for (port 0: any port; of several protocols, any one will do);
    None when they do, or nothing is known."""
    if ports is None:
        return None
    if not ports:
        hint = f"; closest Service addresses there: {', '.join(near)}" if near else ""
        return f"kube-proxy's rules in netns {netns} have no Service with the address {ip}{hint}"
    if port and not any(port_label(port, p) in ports for p in protocols):
        want = " or ".join(port_label(port, p) for p in protocols)
        return (
            f"kube-proxy's rules in netns {netns} have no port {want} for Service {ip} "
            f"(its ports: {', '.join(ports)})"
        )
    return None


def node_view(
    topology: Any, node: int | None, ip: str, port: int, protocols: tuple[str, ...] = ("tcp",)
) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """(service_ports, warnings) for the report, from the node netns of a snapshot; the
    same for a live trace and its replay, which both hold that snapshot."""
    ns = topology.namespace(node) if node is not None else None
    if ns is None:
        return None, ()
    ports = ns.service_ports
    warning = service_warning(ip, port, ports, ns.nearest_services, ns.name, protocols)
    return ports, (warning,) if warning else ()
