"""The topology snapshot: what the analysis needs to name and explain namespaces and devices.

BPF events carry only a network-namespace inode and an ifindex. These immutable records map
those numbers to names, bridge ports (with their hairpin flag), veth peers, addresses, the
sysctls that decide a packet's path and the NAT rules for the traced Service. They round-trip
exactly through plain JSON-friendly dicts so that a session can store them next to its events.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tracer.errors import HairtraceError

#: The sysctls that decide whether a ClusterIP connection works, read per namespace.
SYSCTL_KEYS: tuple[str, ...] = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.default.rp_filter",
    "net.netfilter.nf_conntrack_tcp_loose",
)

#: Version of the dict layout written by Topology.to_dict.
FORMAT_VERSION = 1


class FrozenMap(Mapping[str, "str | None"]):
    """An immutable, hashable str -> str|None mapping, so that Namespace stays a value."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str | None] | None = None) -> None:
        self._items: dict[str, str | None] = dict(items or {})

    def __getitem__(self, key: str) -> str | None:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._items,))


@dataclass(frozen=True)
class Interface:
    """One network device as seen inside its namespace.

    kind is the rtnetlink link kind ("veth", "bridge", "vxlan", ...; None for physical and
    loopback devices). master is the name of the device this one is enslaved to (a bridge,
    usually). hairpin is the bridge-port hairpin flag, None when the device is not a bridge
    port. peer_ifindex/peer_netns locate the other end of a veth (peer_netns is the inode of the
    peer's namespace, None when it could not be mapped). addresses are "ADDR/PREFIXLEN" strings.
    up is the administrative state (IFF_UP).
    """

    ifindex: int
    name: str
    kind: str | None = None
    master: str | None = None
    hairpin: bool | None = None
    peer_ifindex: int | None = None
    peer_netns: int | None = None
    addresses: tuple[str, ...] = ()
    mac: str | None = None
    up: bool = False
    mtu: int | None = None  # None: not in the snapshot (taken before hairtrace read it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))

    def to_dict(self) -> dict[str, Any]:
        """This interface as a JSON-friendly dict."""
        return {
            "ifindex": self.ifindex,
            "name": self.name,
            "kind": self.kind,
            "master": self.master,
            "hairpin": self.hairpin,
            "peer_ifindex": self.peer_ifindex,
            "peer_netns": self.peer_netns,
            "addresses": list(self.addresses),
            "mac": self.mac,
            "up": self.up,
            "mtu": self.mtu,
        }

    def holds(self, ip: str) -> bool:
        """Whether one of its addresses ("a.b.c.d/len") is ip."""
        return any(a.split("/")[0] == ip for a in self.addresses)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Interface:
        """Rebuild an interface written by to_dict."""
        return cls(
            ifindex=_get(d, "ifindex", int),
            name=_get(d, "name", str),
            kind=_get(d, "kind", str, optional=True),
            master=_get(d, "master", str, optional=True),
            hairpin=_get(d, "hairpin", bool, optional=True),
            peer_ifindex=_get(d, "peer_ifindex", int, optional=True),
            peer_netns=_get(d, "peer_netns", int, optional=True),
            addresses=tuple(_get_list(d, "addresses", str)),
            mac=_get(d, "mac", str, optional=True),
            up=_get(d, "up", bool),
            mtu=_get(d, "mtu", int, optional=True) if "mtu" in d else None,  # absent before
        )


@dataclass(frozen=True)
class ServiceEntry:
    """One Service port as kube-proxy's rules in a namespace write it.

    name is "namespace/name" (None when the rules carry no name: hand-written rules),
    port_name the Service port's name ("" for an unnamed port), kind how the address
    reaches it ("cluster IP", "external IP", "loadbalancer IP"). endpoints are the
    "IP:PORT" its rules DNAT to, () when kube-proxy rejects it (no endpoints).
    """

    ip: str
    port: int
    proto: str  # tcp | udp | sctp
    name: str | None = None
    port_name: str = ""
    kind: str = "cluster IP"
    endpoints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(self.endpoints))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "port": self.port,
            "proto": self.proto,
            "name": self.name,
            "port_name": self.port_name,
            "kind": self.kind,
            "endpoints": list(self.endpoints),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServiceEntry:
        return cls(
            ip=_get(d, "ip", str),
            port=_get(d, "port", int),
            proto=_get(d, "proto", str),
            name=_get(d, "name", str, optional=True),
            port_name=_get(d, "port_name", str),
            kind=_get(d, "kind", str),
            endpoints=tuple(_get_list(d, "endpoints", str)),
        )


@dataclass(frozen=True)
class Namespace:
    """One network namespace: its devices, path-deciding sysctls and the Service's NAT rules.

    sysctls maps each key of SYSCTL_KEYS to its value, None when the file does not exist there.
    nat_rules are the rules that mention the Service plus the chains they reach, as iptables-save
    lines ("-A CHAIN ...") or nft commands ("add rule FAMILY TABLE CHAIN ...",
    "add element FAMILY TABLE MAP { ... }"). nat_backend says where they came from:
    "iptables", "nftables", "iptables+nftables" when both matched, None when nothing did.
    service_ports are the ports kube-proxy's rules there give the traced address ("80/tcp"),
    () when they give it none (no such Service), None when there are no kube-proxy rules
    (nothing known); nearest_services, when it is no Service, the closest Service addresses.
    service_entries are those rules' entries for the traced address (names, port names,
    endpoints), None when nothing is known (as service_ports). pod is the Kubernetes pod
    ("namespace/name") this is the network namespace of, None when it is none or unknown.
    """

    inode: int
    name: str
    interfaces: tuple[Interface, ...] = ()
    sysctls: Mapping[str, str | None] = field(default_factory=FrozenMap)
    nat_rules: tuple[str, ...] = ()
    nat_backend: str | None = None
    service_ports: tuple[str, ...] | None = None
    nearest_services: tuple[str, ...] = ()
    service_entries: tuple[ServiceEntry, ...] | None = None
    pod: str | None = None  # "namespace/name" of the pod whose netns this is (CNI cache)

    def __post_init__(self) -> None:
        object.__setattr__(self, "interfaces", tuple(self.interfaces))
        if self.service_entries is not None:
            object.__setattr__(self, "service_entries", tuple(self.service_entries))
        object.__setattr__(self, "sysctls", FrozenMap(self.sysctls))
        object.__setattr__(self, "nat_rules", tuple(self.nat_rules))

    def iface(self, ifindex: int) -> Interface | None:
        """The device with this ifindex in this namespace, None if there is none."""
        for i in self.interfaces:
            if i.ifindex == ifindex:
                return i
        return None

    def iface_by_name(self, name: str) -> Interface | None:
        """The device with this name in this namespace, None if there is none."""
        for i in self.interfaces:
            if i.name == name:
                return i
        return None

    def to_dict(self) -> dict[str, Any]:
        """This namespace as a JSON-friendly dict."""
        return {
            "inode": self.inode,
            "name": self.name,
            "interfaces": [i.to_dict() for i in self.interfaces],
            "sysctls": dict(self.sysctls),
            "nat_rules": list(self.nat_rules),
            "nat_backend": self.nat_backend,
            "service_ports": None if self.service_ports is None else list(self.service_ports),
            "nearest_services": list(self.nearest_services),
            "service_entries": None
            if self.service_entries is None
            else [e.to_dict() for e in self.service_entries],
            "pod": self.pod,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Namespace:
        """Rebuild a namespace written by to_dict."""
        sysctls = _get(d, "sysctls", dict)
        for k, v in sysctls.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, str)):
                raise HairtraceError(f"bad topology data: sysctl {k!r} has value {v!r}")
        return cls(
            inode=_get(d, "inode", int),
            name=_get(d, "name", str),
            interfaces=tuple(Interface.from_dict(x) for x in _get_list(d, "interfaces", dict)),
            sysctls=FrozenMap(sysctls),
            nat_rules=tuple(_get_list(d, "nat_rules", str)),
            nat_backend=_get(d, "nat_backend", str, optional=True),
            # absent in sessions written before these were recorded: nothing known
            service_ports=_optional_strs(d, "service_ports"),
            nearest_services=_optional_strs(d, "nearest_services") or (),
            service_entries=None
            if d.get("service_entries") is None
            else tuple(ServiceEntry.from_dict(x) for x in _get_list(d, "service_entries", dict)),
            pod=_get(d, "pod", str, optional=True) if "pod" in d else None,  # absent before
        )


@dataclass(frozen=True)
class Topology:
    """A read-only snapshot of every traced namespace, taken at wall-clock time taken_at."""

    namespaces: tuple[Namespace, ...]
    taken_at: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "namespaces", tuple(self.namespaces))

    def namespace(self, inode: int) -> Namespace | None:
        """The namespace with this inode, None if it was not captured."""
        for ns in self.namespaces:
            if ns.inode == inode:
                return ns
        return None

    def ns_name(self, inode: int) -> str:
        """A display name for a namespace inode; "netns-<inode>" when it was not captured."""
        ns = self.namespace(inode)
        return ns.name if ns is not None else f"netns-{inode}"

    def iface(self, inode: int, ifindex: int) -> Interface | None:
        """The device an event's (netns inode, ifindex) pair refers to, None if unknown."""
        ns = self.namespace(inode)
        return ns.iface(ifindex) if ns is not None else None

    def peer(self, inode: int, ifindex: int) -> tuple[int, Interface] | None:
        """The other end of a veth as (namespace inode, device), None when not captured."""
        dev = self.iface(inode, ifindex)
        if dev is None or dev.peer_ifindex is None or dev.peer_netns is None:
            return None
        other = self.iface(dev.peer_netns, dev.peer_ifindex)
        return (dev.peer_netns, other) if other is not None else None

    def find_by_name(self, name: str) -> Namespace | None:
        """The namespace with this display name, None if there is none."""
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        return None

    def to_dict(self) -> dict[str, Any]:
        """This snapshot as a JSON-friendly dict; Topology.from_dict reverses it exactly."""
        return {
            "version": FORMAT_VERSION,
            "taken_at": self.taken_at,
            "namespaces": [ns.to_dict() for ns in self.namespaces],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Topology:
        """Rebuild a snapshot written by to_dict; malformed data -> HairtraceError."""
        if not isinstance(d, Mapping):
            raise HairtraceError(f"bad topology data: expected an object, got {type(d).__name__}")
        version = _get(d, "version", int)
        if version != FORMAT_VERSION:
            raise HairtraceError(f"bad topology data: unsupported version {version}")
        taken_at = d.get("taken_at")
        if isinstance(taken_at, bool) or not isinstance(taken_at, (int, float)):
            raise HairtraceError(f"bad topology data: 'taken_at' is {taken_at!r}")
        return cls(
            namespaces=tuple(Namespace.from_dict(x) for x in _get_list(d, "namespaces", dict)),
            taken_at=float(taken_at),
        )


def _get(d: Mapping[str, Any], key: str, typ: type, *, optional: bool = False) -> Any:
    """d[key] checked to be of typ (None allowed when optional); else HairtraceError."""
    if not isinstance(d, Mapping):
        raise HairtraceError(f"bad topology data: expected an object, got {type(d).__name__}")
    if key not in d:
        raise HairtraceError(f"bad topology data: missing key {key!r}")
    v = d[key]
    if v is None and optional:
        return None
    # bool is an int subclass: keep them apart both ways.
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise HairtraceError(f"bad topology data: {key!r} is {v!r}, expected {typ.__name__}")
    return v


def _get_list(d: Mapping[str, Any], key: str, item: type) -> list[Any]:
    """d[key] checked to be a list of item."""
    v = _get(d, key, list)
    for x in v:
        if not isinstance(x, item):
            raise HairtraceError(f"bad topology data: {key!r} holds {x!r}")
    return v


def _optional_strs(d: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    """d[key] as a tuple of strings; None when absent or null (older snapshots lack it)."""
    if d.get(key) is None:
        return None
    return tuple(_get_list(d, key, str))
