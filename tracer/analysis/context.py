"""What the pure analysis knows besides events: names, sysctls, losses, time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from tracer.analysis.model import Event


class Names(Protocol):
    """The part of a topology snapshot the analysis needs (tracer.topology.Topology)."""

    def ns_name(self, inode: int) -> str: ...

    def sysctl(self, inode: int, name: str) -> str | None: ...

    def bridge_of(self, inode: int, dev: str) -> str | None: ...

    def is_bridge(self, inode: int, dev: str) -> bool: ...


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

    def is_service(self, ip: str, port: int) -> bool:
        return ip == self.service_ip and (self.service_port == 0 or port == self.service_port)


class TopologyNames:
    """Names adapter over a topology snapshot (tracer.topology.Topology or anything alike)."""

    def __init__(self, topology: Any) -> None:
        self.topology = topology

    def ns_name(self, inode: int) -> str:
        return str(self.topology.ns_name(inode))

    def sysctl(self, inode: int, name: str) -> str | None:
        ns = self.topology.namespace(inode)
        if ns is None:
            return "unknown (namespace not in the topology snapshot)"
        value = ns.sysctls.get(name)
        return None if value is None else str(value)

    def _iface(self, inode: int, dev: str) -> Any:
        ns = self.topology.namespace(inode)
        return ns.iface_by_name(dev) if ns is not None else None

    def bridge_of(self, inode: int, dev: str) -> str | None:
        iface = self._iface(inode, dev)
        return iface.master if iface is not None else None

    def is_bridge(self, inode: int, dev: str) -> bool:
        iface = self._iface(inode, dev)
        return iface is not None and iface.kind == "bridge"


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


def scope_fields(
    events: list[Event], topology: Any, scope: frozenset[int] | None
) -> dict[str, Any]:
    """The report's `scope` (namespace names) and `events_out_of_scope`."""
    if scope is None:
        return {"scope": None, "events_out_of_scope": 0}
    names = tuple(sorted(str(topology.ns_name(i)) for i in scope))
    return {"scope": names, "events_out_of_scope": sum(e.netns not in scope for e in events)}
