"""What the pure analysis knows besides events: names, sysctls, losses, time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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
