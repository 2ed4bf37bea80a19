"""Finding network namespaces: by name, by path, and every one reachable on this machine.

A namespace is identified by the inode of its nsfs file, the same number the BPF side reports.
Paths are kept so that the collector can open the namespace later (and check that the inode
did not change in between).
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

from tracer.errors import UsageError

#: Where `ip netns` keeps its named namespaces (bind mounts of nsfs files).
NETNS_RUN_DIR = "/run/netns"
#: The caller's namespace.
SELF_NETNS_PATH = "/proc/self/ns/net"

_CLONE_NEWNET = 0x40000000
_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux >= 4.11
#: Fixed inode of the initial network namespace (uapi nsfs.h NET_NS_INIT_INO, Linux >= 6.18);
#: used only when /proc/1/ns/net cannot be read. Older kernels number it dynamically.
_NET_NS_INIT_INO = 0xEFFFFFF9


@dataclass(frozen=True)
class NetnsRef:
    """A network namespace to look into: its inode, a path that opens it and a display name."""

    inode: int
    path: str
    name: str


def netns_inode(path: str) -> int:
    """The inode of the network namespace at path; OSError, or ValueError if not a netns."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_netns_inode(fd)
    finally:
        os.close(fd)


def fd_netns_inode(fd: int) -> int:
    """The inode of the network namespace open as fd; ValueError if fd is not one."""
    try:
        nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            raise ValueError("not a namespace file") from None
        raise
    if nstype != _CLONE_NEWNET:
        raise ValueError("a namespace, but not a network namespace")
    return os.fstat(fd).st_ino


def _init_netns_inode() -> int:
    """Inode of pid 1's network namespace (the host's), or the kernel's fixed init inode."""
    try:
        return os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return _NET_NS_INIT_INO


def _named() -> dict[int, str]:
    """inode -> `ip netns` name for every live namespace under /run/netns (first name wins)."""
    out: dict[int, str] = {}
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except OSError:
        return out
    for name in names:
        try:
            ino = netns_inode(os.path.join(NETNS_RUN_DIR, name))
        except (OSError, ValueError):
            continue  # a stale file whose mount is gone, or not ours to read
        out.setdefault(ino, name)
    return out


def _self_ref(named: dict[int, str]) -> NetnsRef:
    """The caller's namespace: "host" if it is the initial one, its `ip netns` name, or "self"."""
    ino = netns_inode(SELF_NETNS_PATH)
    if ino == _init_netns_inode():
        return NetnsRef(ino, SELF_NETNS_PATH, "host")
    if ino in named:
        return NetnsRef(ino, os.path.join(NETNS_RUN_DIR, named[ino]), named[ino])
    return NetnsRef(ino, SELF_NETNS_PATH, "self")


def _comm(pid: int) -> str:
    """The command name of a process, "?" if it is gone."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def _pid_name(pid: int) -> str:
    """Display name of a namespace known only through a process."""
    return f"pid{pid}:{_comm(pid)}"


def resolve_netns(spec: str | None) -> NetnsRef:
    """Resolve a user's namespace argument.

    None means the caller's namespace; a string without "/" is an `ip netns` name
    (/run/netns/NAME); anything else is a path such as /proc/123/ns/net. Unknown names,
    missing paths and files that are not network namespaces -> UsageError.
    """
    named = _named()
    if spec is None:
        return _self_ref(named)
    if spec == "":
        raise UsageError("unknown network namespace '': empty name")
    if "/" not in spec:
        if spec in (".", ".."):
            raise UsageError(f"unknown network namespace '{spec}': not a valid name")
        path = os.path.join(NETNS_RUN_DIR, spec)
    else:
        path = spec
    try:
        ino = netns_inode(path)
    except FileNotFoundError:
        where = f"no {path} (see `ip netns list`)" if "/" not in spec else "no such file"
        raise UsageError(f"unknown network namespace '{spec}': {where}") from None
    except ValueError as e:
        raise UsageError(f"unknown network namespace '{spec}': {path} is {e}") from None
    except OSError as e:
        raise UsageError(f"unknown network namespace '{spec}': {e.strerror}") from None
    if "/" not in spec:
        return NetnsRef(ino, path, spec)
    if ino in named:
        return NetnsRef(ino, path, named[ino])
    me = _self_ref(named)
    if ino == me.inode:
        return NetnsRef(ino, path, me.name)
    parts = os.path.normpath(path).split("/")
    if len(parts) == 5 and parts[1] == "proc" and parts[2].isdigit() and parts[3:] == ["ns", "net"]:
        return NetnsRef(ino, path, _pid_name(int(parts[2])))
    return NetnsRef(ino, path, path)


def list_netns() -> list[NetnsRef]:
    """Every network namespace reachable from here, one entry per inode.

    First the caller's ("host" when it is pid 1's, else its `ip netns` name or "self"), then
    each `ip netns` name in name order, then namespaces held only by processes, named
    "pid<PID>:<comm>" after their lowest pid. Entries that vanish or cannot be read are skipped.
    """
    named = _named()
    refs = [_self_ref(named)]
    seen = {refs[0].inode}
    for ino, name in sorted(named.items(), key=lambda kv: kv[1]):
        if ino not in seen:
            seen.add(ino)
            refs.append(NetnsRef(ino, os.path.join(NETNS_RUN_DIR, name), name))
    try:
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        pids = []
    for pid in pids:
        path = f"/proc/{pid}/ns/net"
        try:
            ino = os.stat(path).st_ino
        except OSError:
            continue  # gone, a kernel thread without one, or not permitted
        if ino in seen:
            continue
        seen.add(ino)
        refs.append(NetnsRef(ino, path, _pid_name(pid)))
    return refs
