"""What the pure analysis knows besides events: names, sysctls, losses, time, rule drops."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

from tracer.events.model import Event


class Names(Protocol):
    """The part of a topology snapshot the analysis needs (tracer.topology.Topology)."""

    def ns_name(self, inode: int) -> str: ...

    def sysctl(self, inode: int, name: str) -> str | None: ...

    def sysctl_at(self, inode: int, name: str, at_ns: int) -> tuple[str | None, ...]:
        """The values the sysctl may have had at at_ns (one, or two when it changed near
        then: the tracer samples it, so a change is known to within its sampling)."""
        ...

    def bridge_of(self, inode: int, dev: str) -> str | None: ...

    def is_bridge(self, inode: int, dev: str) -> bool: ...

    def kind(self, inode: int, dev: str) -> str | None: ...

    def hairpin(self, inode: int, dev: str) -> bool | None: ...

    def mtus(self, inode: int) -> dict[str, int]: ...

    def service_rules(self, inode: int) -> tuple[str, ...] | None: ...

    def has_address(self, inode: int, ip: str) -> bool | None: ...

    def service_ports(self, inode: int) -> tuple[str, ...] | None: ...

    def nearest_services(self, inode: int) -> tuple[str, ...]: ...

    def pod_of(self, inode: int) -> str | None: ...

    def pod_of_ip(self, ip: str) -> str | None: ...

    def pod_behind(self, inode: int, dev: str) -> str | None: ...


@dataclass(frozen=True)
class RuleDrop:
    """A DROP/REJECT rule (or a DROP chain policy) whose packet counter rose during the trace.

    rule: the iptables-save line without its [p:b] prefix, `policy DROP of chain C`, or
    `table FAMILY NAME chain C: RULE` for nft. hook: the built-in chain(s) (or nft hook(s))
    the rule's chain is reached from, '/'-joined; None when unreachable or unknown.
    """

    table: str
    chain: str
    rule: str
    packets: int
    hook: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "chain": self.chain,
            "hook": self.hook,
            "rule": self.rule,
            "packets": self.packets,
        }

    @classmethod
    def from_dict(cls, d: Any) -> RuleDrop:
        """The inverse of to_dict; TypeError or ValueError on anything malformed."""
        if not isinstance(d, dict):
            raise TypeError("rule drop is not an object")
        strs = [d.get(k) for k in ("table", "chain", "rule")]
        hook, packets = d.get("hook"), d.get("packets")
        if not all(isinstance(v, str) for v in strs) or not (hook is None or isinstance(hook, str)):
            raise ValueError("rule drop: table, chain, rule (and hook) must be strings")
        if isinstance(packets, bool) or not isinstance(packets, int) or packets < 0:
            raise ValueError("rule drop: packets must be a count")
        return cls(d["table"], d["chain"], d["rule"], packets, hook)


@dataclass(frozen=True)
class ConntrackStats:
    """The node's conntrack table as last read while tracing (net.netfilter.nf_conntrack_
    count and _max), and how much its counters (/proc/net/stat/nf_conntrack, summed over
    CPUs) rose since the trace started: entries that could not be confirmed (a clash of
    NAT tuples), packets dropped for want of an entry."""

    count: int
    max: int
    insert_failed: int = 0
    drop: int = 0
    early_drop: int = 0

    @property
    def full(self) -> bool:
        return self.max > 0 and self.count >= self.max

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "max": self.max, "insert_failed": self.insert_failed,
                "drop": self.drop, "early_drop": self.early_drop}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any) -> ConntrackStats:
        """The inverse of to_dict; TypeError or ValueError on anything malformed."""
        if not isinstance(d, dict):
            raise TypeError("conntrack stats is not an object")
        keys = ("count", "max", "insert_failed", "drop", "early_drop")
        vals = [d.get(k) for k in keys]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            raise ValueError("conntrack stats: count, max, insert_failed, drop, early_drop")
        return cls(*vals)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Context:
    """Everything besides events that reassembly and diagnosis read."""

    service_ip: str
    service_port: int  # 0 = any port
    names: Names
    end_ns: int  # monotonic time the trace stopped
    loss_windows: tuple[tuple[int, int], ...] = ()  # (first_ns, last_ns) where events were lost
    drop_reasons: dict[int, str] = field(default_factory=dict)
    # a SYN unanswered for this long counts as failed, not as still in progress
    reply_timeout_ns: int = 1_000_000_000
    # network namespaces of this node (node netns + those whose veth peer is there);
    # None = every namespace seen
    scope: frozenset[int] | None = None
    # DROP/REJECT rules of the node netns whose counters rose while tracing
    rule_drops: tuple[RuleDrop, ...] = ()
    rule_drops_netns: int | None = None  # inode of the netns the counters were read in
    conntrack: ConntrackStats | None = None  # the node netns's table; None: not read
    # a range of Service addresses: service_ip/service_prefix (every port); 32: one address
    service_prefix: int = 32
    # of a range, the addresses that are Services (the node's kube-proxy rules, as the
    # kernel side traces them); None: every address in it
    service_addresses: frozenset[str] | None = None

    def is_service(self, ip: str, port: int) -> bool:
        """ip:port is the traced Service's, or one of the traced range's."""
        if self.service_port and port != self.service_port:
            return False
        if self.service_prefix >= 32:
            return ip == self.service_ip
        if self.service_addresses is not None and ip not in self.service_addresses:
            return False
        return in_prefix(ip, self.service_ip, self.service_prefix)


def prefix_mask(prefix: int) -> int:
    """The IPv4 netmask of a prefix length, as an int."""
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix > 0 else 0


def in_prefix(ip: str, network: str, prefix: int) -> bool:
    """ip (a dotted quad) is in network/prefix; False for anything that is not one."""
    try:
        a, n = (int.from_bytes(socket.inet_aton(x), "big") for x in (ip, network))
    except OSError:
        return False
    mask = prefix_mask(prefix)
    return a & mask == n & mask


@dataclass(frozen=True)
class SysctlChange:
    """A sysctl of a namespace seen to change while tracing: it held `before` at after_ns
    and `value` at by_ns (two samples of the tracer; the change happened in between)."""

    after_ns: int
    by_ns: int
    netns: int
    key: str
    before: str | None
    value: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"after_ns": self.after_ns, "by_ns": self.by_ns, "netns": self.netns,
                "key": self.key, "before": self.before, "value": self.value}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any) -> SysctlChange:
        """The inverse of to_dict; TypeError or ValueError on anything malformed."""
        if not isinstance(d, dict):
            raise TypeError("sysctl change is not an object")
        ints = [d.get(k) for k in ("after_ns", "by_ns", "netns")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ValueError("sysctl change: after_ns, by_ns, netns must be integers")
        texts = (d.get("before"), d.get("value"))
        if not isinstance(d.get("key"), str) or not all(
            v is None or isinstance(v, str) for v in texts
        ):
            raise ValueError("sysctl change: key must be a string, before/value strings or null")
        return cls(d["after_ns"], d["by_ns"], d["netns"], d["key"], d["before"], d["value"])


class TopologyNames:
    """Names adapter over a topology snapshot (tracer.topology.Topology or anything alike),
    with the sysctl changes seen since it was taken (in time order)."""

    def __init__(self, topology: Any, changes: tuple[SysctlChange, ...] = ()) -> None:
        self.topology = topology
        self.changes = changes
        self._pod_ips: dict[str, str] | None = None

    def ns_name(self, inode: int) -> str:
        return str(self.topology.ns_name(inode))

    def sysctl(self, inode: int, name: str) -> str | None:
        ns = self.topology.namespace(inode)
        if ns is None:
            return "unknown (namespace not in the topology snapshot)"
        value = ns.sysctls.get(name)
        return None if value is None else str(value)

    def sysctl_at(self, inode: int, name: str, at_ns: int) -> tuple[str | None, ...]:
        last: SysctlChange | None = None
        for ch in self.changes:  # in time order, each `before` the previous one's value
            if ch.netns != inode or ch.key != name:
                continue
            if at_ns <= ch.after_ns:
                return (ch.before,)
            if at_ns < ch.by_ns:  # between the two samples: either
                return (ch.before, ch.value)
            last = ch
        return (last.value,) if last is not None else (self.sysctl(inode, name),)

    def _iface(self, inode: int, dev: str) -> Any:
        ns = self.topology.namespace(inode)
        return ns.iface_by_name(dev) if ns is not None else None

    def bridge_of(self, inode: int, dev: str) -> str | None:
        iface = self._iface(inode, dev)
        return iface.master if iface is not None else None

    def is_bridge(self, inode: int, dev: str) -> bool:
        iface = self._iface(inode, dev)
        return iface is not None and iface.kind == "bridge"

    def kind(self, inode: int, dev: str) -> str | None:
        iface = self._iface(inode, dev)
        return iface.kind if iface is not None else None

    def hairpin(self, inode: int, dev: str) -> bool | None:
        iface = self._iface(inode, dev)
        return iface.hairpin if iface is not None else None

    def mtus(self, inode: int) -> dict[str, int]:
        """Device name -> MTU of that namespace's devices (those the snapshot has one for)."""
        ns = self.topology.namespace(inode)
        if ns is None:
            return {}
        return {i.name: i.mtu for i in ns.interfaces if getattr(i, "mtu", None)}

    def has_address(self, inode: int, ip: str) -> bool | None:
        """Whether an interface of that namespace holds ip; None when it is not in the snapshot."""
        ns = self.topology.namespace(inode)
        if ns is None:
            return None
        return any(i.holds(ip) for i in ns.interfaces)

    def service_rules(self, inode: int) -> tuple[str, ...] | None:
        """The Service's NAT rules in that namespace; None when it is not in the snapshot."""
        ns = self.topology.namespace(inode)
        return tuple(ns.nat_rules) if ns is not None else None

    def service_ports(self, inode: int) -> tuple[str, ...] | None:
        """The traced address's ports in kube-proxy's rules there ("80/tcp"); () when they
        have no such Service; None when unknown (no kube-proxy rules, not in the snapshot)."""
        ns = self.topology.namespace(inode)
        ports = getattr(ns, "service_ports", None) if ns is not None else None
        return None if ports is None else tuple(ports)

    def pod_of(self, inode: int) -> str | None:
        """The pod ("namespace/name") that namespace is, None when none or unknown."""
        ns = self.topology.namespace(inode)
        return getattr(ns, "pod", None) if ns is not None else None

    def pod_behind(self, inode: int, dev: str) -> str | None:
        """The pod a host-side veth leads to (its peer's netns's pod), None when none."""
        iface = self._iface(inode, dev)
        peer = getattr(iface, "peer_netns", None) if iface is not None else None
        return self.pod_of(peer) if peer is not None else None

    def pod_of_ip(self, ip: str) -> str | None:
        """The pod holding ip in the snapshot, None when none or unknown."""
        if self._pod_ips is None:  # built once: the snapshot does not change
            self._pod_ips = {}
            for ns in self.topology.namespaces:
                pod = getattr(ns, "pod", None)
                for i in ns.interfaces if pod is not None else ():
                    for addr in i.addresses:
                        self._pod_ips.setdefault(addr.split("/")[0], str(pod))
        return self._pod_ips.get(ip)

    def nearest_services(self, inode: int) -> tuple[str, ...]:
        """When the traced address is no Service there: the closest Service addresses."""
        ns = self.topology.namespace(inode)
        return tuple(getattr(ns, "nearest_services", ()) or ()) if ns is not None else ()


def node_scope(topology: Any, node: int) -> frozenset[int] | None:
    """The node's namespace and every namespace joined to it by a veth pair: on a
    Kubernetes node, the host and its pods. None when the snapshot cannot tell
    (no veth peer resolved), so nothing is filtered on a guess."""
    ns = topology.namespace(node)
    if ns is None:
        return None
    joined = {i.peer_netns for i in ns.interfaces if i.peer_netns not in (None, node)}
    for other in topology.namespaces:
        if any(i.peer_netns == node for i in other.interfaces):
            joined.add(other.inode)
    return frozenset({node, *joined}) if joined else None


def in_scope(events: list[Event], scope: frozenset[int] | None) -> list[Event]:
    return events if scope is None else [e for e in events if e.netns in scope]


def scope_fields(out_of_scope: int, topology: Any, scope: frozenset[int] | None) -> dict[str, Any]:
    """The report's `scope` (namespace names) and `events_out_of_scope` (the engine's
    count: StreamAnalyser.events_out_of_scope)."""
    if scope is None:
        return {"scope": None, "events_out_of_scope": 0}
    names = tuple(sorted(str(topology.ns_name(i)) for i in scope))
    return {"scope": names, "events_out_of_scope": out_of_scope}
