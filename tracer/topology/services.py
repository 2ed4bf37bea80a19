"""Which Service addresses and ports kube-proxy's rules on a node define.

Pure text processing of `iptables-save` (nat and filter tables) and `nft list ruleset`
output, no system access. kube-proxy writes, per Service port:
  - iptables mode: `-A KUBE-SERVICES -d IP/32 -p tcp ... --dport PORT -j KUBE-SVC-...`
    in the nat table, or, when the Service has no endpoints, the same match with
    `-j REJECT` in the filter table's KUBE-SERVICES;
  - nftables mode (table `ip kube-proxy`): an element `IP . tcp . PORT : goto service-...`
    of map `service-ips`, or of `no-endpoint-services` without endpoints.
Comments (iptables) and chain names (nftables) name each Service port "namespace/name"
and its port name; the chains a port leads to give its endpoints (DNAT destinations).
So "no such Service" is said only when kube-proxy's rules are there (a KUBE-SERVICES chain
or a kube-proxy nft table) and none of them names the address or port; without them
(another proxy, IPVS, no rules readable) nothing is known and nothing is said.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from tracer.errors import UsageError
from tracer.topology.model import ServiceEntry

_NFT_ELEMENT = re.compile(
    r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})\s+\.\s+(tcp|udp|sctp)\s+\.\s+(\d{1,5})(?![\d.])"
    r'(?:\s+comment\s+"([^"]*)")?(?:\s*:\s*(?:goto|jump)\s+"?([^\s,}"]+))?'
)
_NFT_KUBE_TABLE = re.compile(r"^\s*table\s+ip\s+kube-proxy\b", re.MULTILINE)
_NFT_CHAIN = re.compile(r"^\s*chain\s+\"?([^\s\"{]+)\"?\s*\{(.*?)^\s*\}", re.MULTILINE | re.DOTALL)
# service-HASH-ns/name/proto/portname (cluster IP), external-HASH-... (external, LB IPs)
_NFT_SERVICE_CHAIN = re.compile(
    r"^(service|external)-[A-Z2-7]{8}-([^/\s]+)/([^/\s]+)/(?:tcp|udp|sctp)/(\S*)$"
)
_NFT_JUMP = re.compile(r"\b(?:goto|jump)\s+\"?((?:service|external|endpoint)-[^\s,}\"]+)")
_NFT_DNAT = re.compile(r"\bdnat\s+(?:ip\s+)?to\s+([\d.]+:\d+)")

_IPT_COMMENT = re.compile(r'\s--comment\s+(?:"((?:[^"\\]|\\.)*)"|(\S+))')
_IPT_JUMP = re.compile(r"\s-j\s+(KUBE-(?:SVC|SVL|SEP|EXT|FW)-[A-Z2-7]+)\b")
_IPT_DNAT = re.compile(r"--to-destination\s+([\d.]+:\d+)")
# "ns/name cluster IP", "ns/name:port cluster IP", older "ns/name: cluster IP",
# "ns/name:port has no endpoints" (the filter table's REJECT)
_KUBE_COMMENT = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)/([^\s:/]+)(?::(\S*))?"
    r"\s+(cluster IP|external IP|loadbalancer IP|has no endpoints|has no local endpoints)"
)
_KINDS = ("cluster IP", "external IP", "loadbalancer IP")


def service_entries(ipt_text: str, nft_text: str) -> tuple[ServiceEntry, ...] | None:
    """Every Service port kube-proxy's rules in this text define, with its name and
    endpoints where the rules give them; None when the text holds no kube-proxy rules at
    all (so nothing can be said about a missing Service). ipt_text is `iptables-save` of
    the nat and filter tables, nft_text `nft list ruleset`."""
    found: dict[tuple[str, int, str, str], ServiceEntry] = {}
    kube = False
    chains: dict[str, list[str]] = {}
    portals: list[str] = []
    for line in ipt_text.splitlines():
        if line.startswith(":KUBE-SERVICES "):
            kube = True
        if not line.startswith("-A "):
            continue
        chain, _, rest = line[3:].partition(" ")
        if chain == "KUBE-SERVICES":
            kube = True
            portals.append(line)
        elif chain.startswith(("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-")):
            chains.setdefault(chain, []).append(rest)
    for line in portals:
        entry = _iptables_entry(line, chains)
        if entry is not None:
            found.setdefault((entry.ip, entry.port, entry.proto, entry.kind), entry)
    for table in _NFT_KUBE_TABLE.finditer(nft_text):
        kube = True
        body = _nft_table_body(nft_text, table.start())
        nft_chains = {m.group(1): m.group(2) for m in _NFT_CHAIN.finditer(body)}
        for m in _NFT_ELEMENT.finditer(body):
            entry = _nft_entry(m, nft_chains)
            found.setdefault((entry.ip, entry.port, entry.proto, entry.kind), entry)
    if not kube:
        return None
    return tuple(found.values())


def kube_services(ipt_text: str, nft_text: str) -> dict[str, frozenset[str]] | None:
    """Service address -> its ports ("80/tcp") in kube-proxy's rules; None when the text
    holds no kube-proxy rules at all (so nothing can be said about a missing Service)."""
    entries = service_entries(ipt_text, nft_text)
    return None if entries is None else ports_by_address(entries)


def ports_by_address(entries: tuple[ServiceEntry, ...]) -> dict[str, frozenset[str]]:
    found: dict[str, set[str]] = {}
    for e in entries:
        found.setdefault(e.ip, set()).add(port_label(e.port, e.proto))
    return {addr: frozenset(ports) for addr, ports in found.items()}


def _iptables_entry(line: str, chains: dict[str, list[str]]) -> ServiceEntry | None:
    """The Service port a KUBE-SERVICES rule matches (one destination and port), named
    by its comment, with the endpoints its KUBE-SVC chain leads to."""
    portal = _iptables_portal(line)
    if portal is None:
        return None
    addr, port, proto = portal
    name, port_name, kind = None, "", "cluster IP"
    comment = _IPT_COMMENT.search(line)
    if comment is not None:
        named = _KUBE_COMMENT.match(comment.group(1) or comment.group(2) or "")
        if named is not None:
            name = f"{named.group(1)}/{named.group(3)}"
            port_name = named.group(4) or ""
            kind = named.group(5) if named.group(5) in _KINDS else "cluster IP"
    endpoints: list[str] = []
    jump = _IPT_JUMP.search(line)
    if jump is not None:
        _follow(jump.group(1), lambda c: " " + " ".join(chains.get(c, ())), _IPT_JUMP, _IPT_DNAT,
                endpoints)  # fmt: skip
    return ServiceEntry(addr, port, proto, name, port_name, kind, tuple(endpoints))


def _nft_entry(m: re.Match[str], chains: dict[str, str]) -> ServiceEntry:
    """The Service port of one `IP . proto . PORT [comment "..."] : goto CHAIN` element."""
    addr, proto, port, comment, target = m.groups()
    name, port_name, kind = None, "", "cluster IP"
    named = _NFT_SERVICE_CHAIN.match(target or "")
    if named is not None:
        kind = "cluster IP" if named.group(1) == "service" else "external IP"
        name, port_name = f"{named.group(2)}/{named.group(3)}", named.group(4)
    elif comment:  # no-endpoint-services: the element's comment is "ns/name[:port]"
        ns, _, rest = comment.partition("/")
        svc, _, port_name = rest.partition(":")
        if ns and svc:
            name = f"{ns}/{svc}"
    endpoints: list[str] = []
    if target and target in chains:
        _follow(target, lambda c: chains.get(c, ""), _NFT_JUMP, _NFT_DNAT, endpoints)
    return ServiceEntry(addr, int(port), proto, name, port_name, kind, tuple(endpoints))


def _follow(
    start: str, body: Any, jump: re.Pattern[str], dnat: re.Pattern[str], out: list[str]
) -> None:
    """Append to out the DNAT destinations of start's chain and the chains it reaches."""
    todo, seen = [start], {start}  # breadth first: endpoints in rule order
    while todo:
        text = body(todo.pop(0))
        for d in dnat.findall(text):
            if d not in out:
                out.append(d)
        for c in jump.findall(text):
            if c not in seen:
                seen.add(c)
                todo.append(c)


def _iptables_portal(line: str) -> tuple[str, int, str] | None:
    """(address, port, proto) of a KUBE-SERVICES rule matching one destination and port."""
    text = _IPT_COMMENT.sub(" ", line)  # the only quoted argument kube-proxy writes
    tokens = text.split()
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
    return addr, port, proto


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


def find_by_name(
    entries: tuple[ServiceEntry, ...], name: str, port: int | str | None
) -> tuple[ServiceEntry, ...]:
    """The cluster-IP entries of Service name ("ns/name"), of one port when port is a
    number or a port name; () when there are none."""
    out = []
    for e in entries:
        if e.name != name or e.kind != "cluster IP":
            continue
        if isinstance(port, int) and e.port != port:
            continue
        if isinstance(port, str) and e.port_name != port:
            continue
        out.append(e)
    return tuple(out)


def resolve_name(
    entries: tuple[ServiceEntry, ...] | None,
    name: str,
    port: int,
    port_name: str | None,
    protocols: tuple[str, ...],
    netns: str,
) -> tuple[str, int, tuple[str, ...]]:
    """(cluster IP, port, protocols) of Service name ("ns/name") from the node's kube-proxy
    rules: its one port when port, port_name or the protocols single one out, else port 0
    (all its ports); UsageError naming close matches when the rules have no such Service."""
    where = f"kube-proxy's rules in netns {netns}"
    if entries is None:
        raise UsageError(
            f"cannot resolve Service {name}: no kube-proxy rules (iptables or nftables mode) "
            f"in netns {netns}; give its ClusterIP instead"
        )
    named = find_by_name(entries, name, None)
    if not named:
        near = close_names(entries, name)
        hint = f"; close matches: {', '.join(near)}" if near else ""
        raise UsageError(f"no Service {name} in {where}{hint}")
    want = port_name if port_name is not None else (port or None)
    hits = tuple(e for e in find_by_name(entries, name, want) if e.proto in protocols)
    if not hits:
        asked = port_name or (str(port) if port else "")
        asked += "/" + "|".join(protocols) if len(protocols) == 1 else ""
        ports = ", ".join(sorted({_entry_label(e) for e in named}))
        raise UsageError(f"Service {name} has no port {asked or 'tcp/udp'} in {where} "
                         f"(its ports: {ports})")  # fmt: skip
    ips = {e.ip for e in hits}
    if len(ips) > 1:  # one ClusterIP per Service and family: not kube-proxy's rules
        raise UsageError(
            f"Service {name} has several addresses in {where}: {', '.join(sorted(ips))}"
        )
    ports_hit = {e.port for e in hits}
    protos = tuple(p for p in protocols if any(e.proto == p for e in hits))
    return ips.pop(), ports_hit.pop() if len(ports_hit) == 1 else 0, protos


def _entry_label(e: ServiceEntry) -> str:
    port = port_label(e.port, e.proto)
    return f"{e.port_name} {port}" if e.port_name else port


def close_names(entries: tuple[ServiceEntry, ...], name: str, limit: int = 3) -> tuple[str, ...]:
    """The Service names in entries that look most like name (for "did you mean")."""
    names = sorted({e.name for e in entries if e.name})
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.5)
    if not close:  # same name in another namespace, or same namespace
        short = name.rpartition("/")[2]
        close = [n for n in names if n.rpartition("/")[2] == short][:limit]
    return tuple(close)


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


@dataclass(frozen=True)
class NodeView:
    """What the node's kube-proxy rules say of the traced address (from the snapshot of the
    node netns; the same for a live trace and its replay, which both hold it).

    ports: its ports there ("80/tcp"), None when unknown; warnings: said at start; name,
    port_name: the Service's and its port's, None when the rules do not give exactly one;
    endpoints: (ip, port, proto) its rules DNAT to, None when unknown."""

    ports: tuple[str, ...] | None = None
    warnings: tuple[str, ...] = ()
    name: str | None = None
    port_name: str | None = None
    endpoints: tuple[tuple[str, int, str], ...] | None = None
    # (ip, port, proto) -> "ns/name" of every traced Service port the rules name
    names: dict[tuple[str, int, str], str] = field(default_factory=dict)


def in_range(ip: str, network: str, prefix: int) -> bool:
    """ip is in network/prefix (prefix 32: ip is network)."""
    if prefix >= 32:
        return ip == network
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(f"{network}/{prefix}")
    except ValueError:
        return False


def addresses_in_range(
    entries: Iterable[ServiceEntry] | None, ip: str, prefix: int
) -> frozenset[str] | None:
    """Of a range (prefix < 32), the Service addresses in it that kube-proxy's rules
    (entries) have (pods and nodes may share the range); None for one address, or when the
    rules are not known or have none in it: every address of the range then counts. The
    kernel's set (tracer.trace.range_services) and the analysis's (range_addresses)."""
    if prefix >= 32:
        return None
    found = frozenset(e.ip for e in entries or () if in_range(e.ip, ip, prefix))
    return found or None


def range_addresses(topology: Any, node: int | None, ip: str, prefix: int) -> frozenset[str] | None:
    """addresses_in_range of the node netns's rules in a snapshot."""
    ns = topology.namespace(node) if node is not None and prefix < 32 else None
    return addresses_in_range(getattr(ns, "service_entries", None) if ns else None, ip, prefix)


def service_names(
    entries: tuple[ServiceEntry, ...] | None, ip: str, port: int, prefix: int = 32
) -> dict[tuple[str, int, str], str]:
    """(ip, port, proto) -> name of the cluster-IP entries in ip/prefix (and of port)."""
    out: dict[tuple[str, int, str], str] = {}
    for e in entries or ():
        mine = in_range(e.ip, ip, prefix) and (not port or e.port == port)
        if mine and e.name and e.kind == "cluster IP":
            out.setdefault((e.ip, e.port, e.proto), e.name)
    return out


def node_view(
    topology: Any,
    node: int | None,
    ip: str,
    port: int,
    protocols: tuple[str, ...] = ("tcp",),
    prefix: int = 32,
) -> NodeView:
    """The NodeView of the traced address (or range: ip/prefix) in the snapshot's node
    netns."""
    ns = topology.namespace(node) if node is not None else None
    if ns is None:
        return NodeView()
    if prefix < 32:
        return _range_view(ns, ip, prefix, protocols)
    ports = ns.service_ports
    warning = service_warning(ip, port, ports, ns.nearest_services, ns.name, protocols)
    view = NodeView(ports, (warning,) if warning else ())
    entries = ns.service_entries
    if entries is None:
        return view
    mine = [
        e for e in entries if e.ip == ip and e.proto in protocols and (not port or e.port == port)
    ]
    names = {e.name for e in mine if e.name}
    port_names = {e.port_name for e in mine}
    name = names.pop() if len(names) == 1 else None
    port_name = port_names.pop() if len(port_names) == 1 and name else ""
    return replace(view, name=name, port_name=port_name or None, endpoints=_endpoints(mine),
                   names=service_names(entries, ip, port))  # fmt: skip


def _endpoints(entries: Iterable[ServiceEntry]) -> tuple[tuple[str, int, str], ...]:
    """The DNAT targets of these entries as (ip, port, proto), each once, in rule order."""
    out: list[tuple[str, int, str]] = []
    for e in entries:
        for ep in e.endpoints:
            addr, _, p = ep.rpartition(":")
            if (addr, int(p), e.proto) not in out:
                out.append((addr, int(p), e.proto))
    return tuple(out)


def _range_view(ns: Any, ip: str, prefix: int, protocols: tuple[str, ...]) -> NodeView:
    """A range of Service addresses: no one name or port list; the names of its Services,
    their endpoints, and a warning when the rules have no Service in it."""
    entries = ns.service_entries
    if entries is None:
        return NodeView()
    mine = [e for e in entries if e.proto in protocols and in_range(e.ip, ip, prefix)]
    warnings: tuple[str, ...] = ()
    if not mine:
        warnings = (f"kube-proxy's rules in netns {ns.name} have no Service in {ip}/{prefix}",)
    return NodeView(None, warnings, endpoints=_endpoints(mine),
                    names=service_names(entries, ip, 0, prefix))  # fmt: skip
