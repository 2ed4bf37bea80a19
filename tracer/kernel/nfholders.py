"""Which processes hold BPF netfilter links at a hook, found through /proc/*/fdinfo.

The kernel refuses a second BPF netfilter link at the same (netns, pf, hook,
priority) with EBUSY and does not say whose the first one is. A link fd's
fdinfo does (bpf_nf_link_show_info, net/netfilter/nf_bpf_link.c); on 6.18:

    link_type:	netfilter
    link_id:	526
    prog_tag:	f887243b53b44f9b
    prog_id:	805
    pf:	2	hooknum:	0	prio:	-199

It names no netns, so a holder found here may hold its link in another netns:
callers say "holds a link at", not "blocks you". Read only when an attach has
already failed, so the cost of reading every fdinfo does not matter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tracer.kernel.libbpf import NFPROTO_IPV4

# "key:\tvalue" pairs, several to a line in the netfilter part
_FIELD = re.compile(r"(\w+):\t(\S+)")


@dataclass(frozen=True)
class NfLink:
    """A BPF netfilter link some process holds open."""

    pid: int
    comm: str
    pf: int
    hook: int
    priority: int


def parse_fdinfo(text: str) -> tuple[int, int, int] | None:
    """(pf, hooknum, priority) of a BPF netfilter link's fdinfo; None for any other fd."""
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(text):
        fields.setdefault(key, value)
    if fields.get("link_type") != "netfilter":
        return None
    prio = fields.get("prio", fields.get("priority"))  # the kernel prints "prio"
    try:
        return int(fields["pf"]), int(fields["hooknum"]), int(prio or "")
    except (KeyError, ValueError):
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:  # the process or fd went away meanwhile, or is not ours to read
        return None


def nf_links(proc: Path = Path("/proc")) -> list[NfLink]:
    """Every BPF netfilter link held open by a process under proc, by pid then fd."""
    found: list[NfLink] = []
    pids = sorted(int(p.name) for p in _entries(proc) if p.name.isdigit())
    for pid in pids:
        fdinfo = proc / str(pid) / "fdinfo"
        fds = sorted(int(f.name) for f in _entries(fdinfo) if f.name.isdigit())
        comm: str | None = None
        for fd in fds:
            text = _read(fdinfo / str(fd))
            link = parse_fdinfo(text) if text else None
            if link is None:
                continue
            if comm is None:
                comm = (_read(proc / str(pid) / "comm") or "?").strip()
            found.append(NfLink(pid, comm, *link))
    return found


def _entries(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def holders(
    hook: int, lo: int, hi: int, pf: int = NFPROTO_IPV4, proc: Path = Path("/proc")
) -> list[NfLink]:
    """The links at this pf and hook with a priority in [lo, hi]."""
    return [
        link
        for link in nf_links(proc)
        if link.pf == pf and link.hook == hook and lo <= link.priority <= hi
    ]


def describe(links: list[NfLink]) -> str:
    """'pid 812 (hairtrace), pid 901 (bpftool)': each holder once, in pid order."""
    seen: dict[int, str] = {}
    for link in links:
        seen.setdefault(link.pid, link.comm)
    return ", ".join(f"pid {pid} ({comm})" for pid, comm in seen.items())
