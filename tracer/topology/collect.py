"""Taking a topology snapshot: links, addresses, sysctls and NAT rules of each namespace,
and the pod each one is (tracer.topology.pods).

Each namespace is read by its own short-lived thread that setns()es into it and then exits,
so the caller's thread never changes namespace. Inside that thread a netlink socket (pyroute2)
lists links and addresses, /proc/sys shows that namespace's sysctls (they resolve against the
reading thread's namespace), and iptables-save / nft run as children inherit it. The threads
run in parallel. Nothing is written: the snapshot only reads.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from tracer.errors import HairtraceError, UsageError
from tracer.topology.model import SYSCTL_KEYS, Interface, Namespace, ServiceEntry, Topology
from tracer.topology.natrules import (
    IPTABLES_TABLES,
    filter_iptables_save,
    filter_nft_ruleset,
    nft_tables_owned_by_iptables,
    range_matcher,
)
from tracer.topology.netns import NetnsRef, fd_netns_inode, list_netns
from tracer.topology.pods import pods_by_inode, read_cache
from tracer.topology.services import in_range, nearest, ports_by_address, service_entries

_CLONE_NEWNET = 0x40000000
_IFF_UP = 0x1
_PEER_KINDS = frozenset({"veth", "netkit"})
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
#: How long one namespace may take before the snapshot gives up.
NS_TIMEOUT_S = 20.0
#: How many namespaces are read at once (each runs iptables-save and nft).
MAX_PARALLEL = 16
#: How long one rules command may run.
CMD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class _Service:
    """The traced Service, validated."""

    ip: str
    port: int | None
    version: int
    prefix: int = 32  # a range of Service addresses: ip/prefix


def _service(service_ip: str, service_port: int | None, prefix: int = 32) -> _Service:
    """Check the Service address and port; UsageError on bad input."""
    try:
        addr = ipaddress.ip_address(service_ip)
    except ValueError:
        raise UsageError(f"bad service address '{service_ip}': not an IP address") from None
    if service_port is not None and (
        isinstance(service_port, bool)
        or not isinstance(service_port, int)
        or not 0 < service_port < 65536
    ):
        raise UsageError(f"bad service port '{service_port}': expected 1-65535")
    if not 1 <= prefix <= 32 or (prefix < 32 and addr.version != 4):
        raise UsageError(f"bad service range '{service_ip}/{prefix}': expected IPv4 /1-/32")
    return _Service(str(addr), service_port, addr.version, prefix)


def read_sysctls(root: str = "/proc/sys") -> dict[str, str | None]:
    """SYSCTL_KEYS read under root as seen by the calling thread; None where a file is missing."""
    out: dict[str, str | None] = {}
    for key in SYSCTL_KEYS:
        try:
            with open(os.path.join(root, *key.split(".")), encoding="ascii") as f:
                out[key] = f.read().strip()
        except FileNotFoundError:
            out[key] = None
        except OSError as e:
            raise HairtraceError(f"cannot read sysctl {key}: {e.strerror}") from None
    return out


def run_dump(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a read-only rules dump (iptables-save, nft list) with sbin on PATH and the C
    locale; OSError when the tool is missing, TimeoutExpired past CMD_TIMEOUT_S."""
    return subprocess.run(
        argv,
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT_S,
        env={"PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin", "LC_ALL": "C"},
    )


def _run(argv: list[str]) -> tuple[str, str] | None:
    """(stdout, stderr) of a rules dump; None when the tool is missing or fails."""
    try:
        p = run_dump(argv)
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        raise HairtraceError(f"`{' '.join(argv)}` did not finish in {CMD_TIMEOUT_S:g} s") from None
    if p.returncode != 0:
        return None  # e.g. no nat support in this kernel: nothing to report
    return p.stdout, p.stderr


@dataclass(frozen=True)
class NatRules:
    """The Service's NAT rules in one namespace and what kube-proxy's rules say of it."""

    rules: tuple[str, ...]
    backend: str | None  # iptables | nftables | iptables+nftables | None
    service_ports: tuple[str, ...] | None  # the address's ports there; None: no kube-proxy
    nearest_services: tuple[str, ...]  # when the address is no Service: the closest ones
    entries: tuple[ServiceEntry, ...] | None = None  # the address's, named; None: unknown


def _rule_dumps(version: int) -> tuple[str, tuple[str, str] | None, tuple[str, str] | None]:
    """(iptables-save command, its nat table dump, `nft list ruleset`) of the calling
    thread's namespace; a dump is None when its tool is missing or fails."""
    save = "iptables-save" if version == 4 else "ip6tables-save"
    return save, _run([save, "-t", "nat"]), _run(["nft", "list", "ruleset"])


def nat_rules(svc_ip: str, svc_port: int | None, version: int, prefix: int = 32) -> NatRules:
    """The Service's rules in the calling thread's namespace (prefix < 32: those of every
    Service in the range svc_ip/prefix)."""
    save, ipt, nft = _rule_dumps(version)
    entries = _entries(ipt[0] if ipt else "", nft[0] if nft else "", save)
    if prefix < 32:
        return _range_rules(svc_ip, prefix, ipt, nft, entries)
    ipt_rules = filter_iptables_save(ipt[0], svc_ip, svc_port) if ipt else ()
    nft_rules: tuple[str, ...] = ()
    if nft:
        skip = set(nft_tables_owned_by_iptables(nft[1]))
        if ipt and "(nf_tables)" in ipt[0].split("\n", 1)[0]:
            skip |= {(fam, t) for fam in ("ip", "ip6") for t in IPTABLES_TABLES}
        nft_rules = filter_nft_ruleset(nft[0], svc_ip, svc_port, skip)
    backend = "+".join(
        name for name, rules in (("iptables", ipt_rules), ("nftables", nft_rules)) if rules
    )
    ports: tuple[str, ...] | None = None
    near: tuple[str, ...] = ()
    mine: tuple[ServiceEntry, ...] | None = None
    if entries is not None:
        services = ports_by_address(entries)
        ports = tuple(sorted(services.get(svc_ip, ()), key=_port_order))
        near = () if ports else nearest(services, svc_ip)
        mine = tuple(e for e in entries if e.ip == svc_ip)
    return NatRules(ipt_rules + nft_rules, backend or None, ports, near, mine)


def _range_rules(
    net: str,
    prefix: int,
    ipt: tuple[str, str] | None,
    nft: tuple[str, str] | None,
    entries: tuple[ServiceEntry, ...] | None,
) -> NatRules:
    """NatRules of a range: the rules of every Service address in it (those kube-proxy's
    rules have, when known: pods may share the range), their entries; no one address's
    ports (service_ports None: a connection's own Service is not checked against them)."""
    mine = None if entries is None else tuple(e for e in entries if in_range(e.ip, net, prefix))
    within = range_matcher(net, prefix, None if mine is None else {e.ip for e in mine})
    ipt_rules = filter_iptables_save(ipt[0], net, None, within) if ipt else ()
    nft_rules: tuple[str, ...] = ()
    if nft:
        skip = set(nft_tables_owned_by_iptables(nft[1]))
        if ipt and "(nf_tables)" in ipt[0].split("\n", 1)[0]:
            skip |= {(fam, t) for fam in ("ip", "ip6") for t in IPTABLES_TABLES}
        nft_rules = filter_nft_ruleset(nft[0], net, None, skip, within)
    backend = "+".join(
        name for name, rules in (("iptables", ipt_rules), ("nftables", nft_rules)) if rules
    )
    return NatRules(ipt_rules + nft_rules, backend or None, None, (), mine)


def kube_service_entries(version: int = 4) -> tuple[ServiceEntry, ...] | None:
    """Every Service port of kube-proxy's rules in the calling thread's namespace; None
    when there are no kube-proxy rules (or none could be read)."""
    save, ipt, nft = _rule_dumps(version)
    return _entries(ipt[0] if ipt else "", nft[0] if nft else "", save)


def _entries(ipt_nat: str, nft_text: str, save: str) -> tuple[ServiceEntry, ...] | None:
    ipt_text = ipt_nat
    if ":KUBE-SERVICES " in ipt_text:  # a Service without endpoints is a filter-table REJECT
        filt = _run([save, "-t", "filter"])
        ipt_text += "\n" + (filt[0] if filt else "")
    return service_entries(ipt_text, nft_text)


def for_own_addresses(nat: NatRules, interfaces: Iterable[Interface], ip: str) -> NatRules:
    """nat, knowing nothing of kube-proxy's ports when ip is the namespace's own address:
    that is NodePort traffic, whose rules (KUBE-NODEPORTS) name no address, so the
    ClusterIP portals cannot say it is missing."""
    if any(i.holds(ip) for i in interfaces):
        return replace(nat, service_ports=None, nearest_services=(), entries=None)
    return nat


def _port_order(label: str) -> tuple[int, str]:
    port, _, proto = label.partition("/")
    return int(port), proto


def _setns(fd: int) -> None:
    """Move the calling thread (only) into the network namespace open as fd."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise HairtraceError(f"cannot enter network namespace: {os.strerror(err)}")


def _interfaces(
    links: list[Any], addrs: list[Any], own: int, nsid_to_inode: Mapping[int, int]
) -> tuple[Interface, ...]:
    """Interface records from pyroute2 RTM_NEWLINK / RTM_NEWADDR messages of one namespace."""
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in links}
    kinds: dict[int, str | None] = {}
    for m in links:
        info = m.get_attr("IFLA_LINKINFO")
        kinds[m["index"]] = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    by_if: dict[int, list[str]] = {}
    for a in sorted(addrs, key=lambda a: a["family"] != socket.AF_INET):
        local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if local is not None:
            by_if.setdefault(a["index"], []).append(f"{local}/{a['prefixlen']}")
    out = []
    for m in links:
        idx = m["index"]
        info = m.get_attr("IFLA_LINKINFO")
        master_idx = m.get_attr("IFLA_MASTER")
        hairpin: bool | None = None
        if info is not None and info.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge":
            data = info.get_attr("IFLA_INFO_SLAVE_DATA")
            mode = data.get_attr("IFLA_BRPORT_MODE") if data is not None else None
            hairpin = bool(mode) if mode is not None else None
        peer_ifindex = peer_netns = None
        if kinds[idx] in _PEER_KINDS:
            peer_ifindex = m.get_attr("IFLA_LINK") or None
            nsid = m.get_attr("IFLA_LINK_NETNSID")
            peer_netns = own if nsid is None else nsid_to_inode.get(nsid)
        mac = m.get_attr("IFLA_ADDRESS")
        out.append(
            Interface(
                ifindex=idx,
                name=names[idx],
                kind=kinds[idx],
                master=names.get(master_idx) if master_idx else None,
                hairpin=hairpin,
                peer_ifindex=peer_ifindex,
                peer_netns=peer_netns,
                addresses=tuple(by_if.get(idx, ())),
                mac=mac if isinstance(mac, str) and _MAC.match(mac) else None,
                up=bool(m["flags"] & _IFF_UP),
                mtu=mtu if isinstance(mtu := m.get_attr("IFLA_MTU"), int) else None,
            )
        )
    return tuple(sorted(out, key=lambda i: i.ifindex))


def _hairpin_from_protinfo(ipr: Any) -> dict[int, bool]:
    """ifindex -> hairpin flag from an AF_BRIDGE link dump (IFLA_PROTINFO)."""
    out: dict[int, bool] = {}
    for m in ipr.get_links(family=socket.AF_BRIDGE):
        prot = m.get_attr("IFLA_PROTINFO")
        mode = prot.get_attr("IFLA_BRPORT_MODE") if prot is not None else None
        if mode is not None:
            out[m["index"]] = bool(mode)
    return out


def _nsid_of(ipr: Any, fd: int) -> int | None:
    """The id this namespace gives the namespace open as fd (RTM_GETNSID), None if it has none.

    Read-only: unlike dumping links, RTM_GETNSID never allocates an id.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        r = ipr.get_netnsid(fd=fd)
    except NetlinkError:
        return None
    nsid = r.get("nsid") if r else None
    # NETNSA_NSID is s32 with -1 for "not assigned"; pyroute2 decodes it as u32.
    return nsid if isinstance(nsid, int) and 0 <= nsid < 0x80000000 else None


def _collect(ref: NetnsRef, fd: int, svc: _Service, others: Mapping[int, int]) -> Namespace:
    """Everything about one namespace. Runs in a throwaway thread: it setns()es for good."""
    from pyroute2 import IPRoute  # imported by snapshot() already; cheap here

    _setns(fd)
    with IPRoute(groups=0) as ipr:
        links = list(ipr.get_links())
        addrs = list(ipr.get_addr())
        nsid_to_inode: dict[int, int] = {}
        if any(m.get_attr("IFLA_LINK_NETNSID") is not None for m in links):
            for inode, ofd in others.items():
                nsid = _nsid_of(ipr, ofd)
                if nsid is not None:
                    nsid_to_inode.setdefault(nsid, inode)
        interfaces = _interfaces(links, addrs, ref.inode, nsid_to_inode)
        missing = [
            i
            for i in interfaces
            if i.hairpin is None
            and i.master is not None
            and any(j.name == i.master and j.kind == "bridge" for j in interfaces)
        ]
        if missing:
            flags = _hairpin_from_protinfo(ipr)
            interfaces = tuple(
                replace(i, hairpin=flags.get(i.ifindex)) if i in missing else i for i in interfaces
            )
    nat = nat_rules(svc.ip, svc.port, svc.version, svc.prefix)
    if svc.prefix >= 32:
        nat = for_own_addresses(nat, interfaces, svc.ip)
    return Namespace(
        inode=ref.inode,
        name=ref.name,
        interfaces=interfaces,
        sysctls=read_sysctls(),
        nat_rules=nat.rules,
        nat_backend=nat.backend,
        service_ports=nat.service_ports,
        nearest_services=nat.nearest_services,
        service_entries=nat.entries,
    )


def _open(ref: NetnsRef) -> int:
    """An fd on ref's namespace, checked to still be the same inode; OSError/ValueError."""
    fd = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ino = fd_netns_inode(fd)
    except BaseException:
        os.close(fd)
        raise
    if ino != ref.inode:
        os.close(fd)
        raise ValueError(f"{ref.path} is now namespace {ino}, not {ref.inode}")
    return fd


def snapshot(
    service_ip: str,
    service_port: int | None,
    netns: Iterable[NetnsRef] | None = None,
    *,
    prefix: int = 32,
) -> Topology:
    """A read-only snapshot of the given namespaces (default: every one list_netns finds);
    prefix < 32: the NAT rules of every Service in the range service_ip/prefix.

    Namespaces given explicitly must be readable (else HairtraceError); of the listed ones,
    those that vanish before they are read are left out.
    """
    svc = _service(service_ip, service_port, prefix)
    import pyroute2  # noqa: F401 - import once here, not concurrently in the threads

    explicit = netns is not None
    wanted: list[NetnsRef] = []
    for ref in list_netns() if netns is None else netns:
        if all(ref.inode != w.inode for w in wanted):
            wanted.append(ref)
    fds: dict[int, int] = {}
    try:
        live: list[NetnsRef] = []
        for ref in wanted:
            try:
                fds[ref.inode] = _open(ref)
                live.append(ref)
            except (OSError, ValueError) as e:
                if explicit:
                    raise HairtraceError(
                        f"cannot open network namespace '{ref.name}': {e}"
                    ) from None
        # Other namespaces too, so that veth peers outside the snapshot still get an inode.
        for ref in list_netns() if explicit else ():
            if ref.inode not in fds:
                try:
                    fds[ref.inode] = _open(ref)
                except (OSError, ValueError):
                    pass
        taken_at = time.time()
        results: dict[int, Namespace | BaseException] = {}

        slots = threading.BoundedSemaphore(MAX_PARALLEL)
        given_up = threading.Event()  # set on timeout: the fds are about to be closed

        def work(ref: NetnsRef) -> None:
            try:
                with slots:
                    if given_up.is_set():
                        return
                    results[ref.inode] = _collect(
                        ref, fds[ref.inode], svc, {i: f for i, f in fds.items() if i != ref.inode}
                    )
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                results[ref.inode] = e

        threads = [
            threading.Thread(target=work, args=(r,), name=f"topology-{r.inode}", daemon=True)
            for r in live
        ]
        for t in threads:
            t.start()
        rounds = max(1, -(-len(threads) // MAX_PARALLEL))
        deadline = time.monotonic() + NS_TIMEOUT_S * rounds
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        out: list[Namespace] = []
        for ref, t in zip(live, threads):
            res = results.get(ref.inode)
            if t.is_alive() or res is None:
                given_up.set()
                raise HairtraceError(f"reading network namespace '{ref.name}' timed out")
            if isinstance(res, HairtraceError):
                raise HairtraceError(f"network namespace '{ref.name}': {res}") from res
            if isinstance(res, BaseException):
                raise HairtraceError(f"cannot read network namespace '{ref.name}': {res}") from res
            out.append(res)
        pods = pods_by_inode(read_cache())
        out = [replace(ns, pod=pods[ns.inode]) if ns.inode in pods else ns for ns in out]
        return Topology(namespaces=tuple(out), taken_at=taken_at)
    finally:
        for fd in fds.values():
            os.close(fd)
