"""Which netfilter rules dropped packets: DROP/REJECT rule counters before and after a trace.

Pure text processing of `iptables-save -c` and `nft -a list ruleset` output, except
collect_counters(), which reads both dumps inside a namespace the way collect.snapshot() does
(a throwaway thread that setns()es). Read-only: no rule is written, no counter zeroed.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tracer.analysis.context import ConntrackStats, RuleDrop
from tracer.errors import HairtraceError
from tracer.topology.collect import (
    CMD_TIMEOUT_S,
    _setns,
    kube_service_entries,
    read_sysctls,
    run_dump,
)
from tracer.topology.model import ServiceEntry
from tracer.topology.natrules import (
    _NFT_BLOCK,
    _NFT_REF,
    _NFT_TARGET,
    _QUOTED,
    IPTABLES_TABLES,
    _nft_statements,
    _unquote,
    nft_tables_owned_by_iptables,
)

T = TypeVar("T")

__all__ = [
    "RuleDrop",
    "RuleKey",
    "collect_counters",
    "drops_between",
    "parse_iptables_save_counters",
    "parse_nft_counters",
]

#: (table, chain, rule text, how many identical rules come before it in that chain)
RuleKey = tuple[str, str, str, int]
#: A dump: iptables-save text alone, or (iptables-save text, nft text).
Dump = str | tuple[str, str]

_HOOK_ORDER = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING", "INGRESS", "EGRESS")
_IPT_COUNTED = re.compile(r"\[(\d+):\d+\]\s+(.*)")
_IPT_CHAIN = re.compile(r":(\S+)\s+(\S+)(?:\s+\[(\d+):\d+\])?")
_IPT_JUMP = re.compile(r"\s(?:-j|--jump|-g|--goto)\s+(\S+)")
_NFT_COUNTER = re.compile(r"(?:^|\s)counter packets (\d+) bytes \d+(?=\s|$)")
_NFT_HOOK = re.compile(r"\bhook\s+(\w+)")
_NFT_BRACES = re.compile(r"\{[^{}]*\}")
_NFT_VERDICT = re.compile(r"(?:^|\s)(?:drop|reject(?:\s+with\s+[\w\s-]+)?)$")


@dataclass(frozen=True)
class _Entry:
    """One counted rule or chain policy."""

    key: RuleKey
    packets: int
    drops: bool  # its verdict is DROP / REJECT (a policy: DROP)
    chain: str
    rule: str  # as reported


@dataclass
class _Table:
    """Counted entries of one table and the chain graph that gives their hooks."""

    name: str
    entries: list[_Entry] = field(default_factory=list)
    hooks: dict[str, str] = field(default_factory=dict)  # base chain -> hook
    jumps: dict[str, set[str]] = field(default_factory=dict)  # chain -> chains/maps it uses
    maps: dict[str, set[str]] = field(default_factory=dict)  # nft map -> chains it leads to
    seen: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, chain: str, rule: str, packets: int, drops: bool, shown: str) -> None:
        n = self.seen.get((chain, rule), 0)
        self.seen[(chain, rule)] = n + 1
        self.entries.append(_Entry((self.name, chain, rule, n), packets, drops, chain, shown))

    def hook_of(self, chain: str) -> str | None:
        """The hooks whose base chains reach chain through jumps, gotos and verdict maps."""
        callers: dict[str, set[str]] = {}
        for src, dsts in self.jumps.items():
            for d in dsts:
                targets = self.maps.get(d, set()) if d.startswith("@") else {d}
                for target in targets:
                    callers.setdefault(target, set()).add(src)
        found, todo, done = set(), [chain], {chain}
        while todo:
            c = todo.pop()
            if c in self.hooks:
                found.add(self.hooks[c])
            for p in callers.get(c, ()):
                if p not in done:
                    done.add(p)
                    todo.append(p)
        order = {h: i for i, h in enumerate(_HOOK_ORDER)}
        return "/".join(sorted(found, key=lambda h: (order.get(h, len(order)), h))) or None


def _parse_iptables(text: str) -> list[_Table]:
    """The tables of `iptables-save -c` text; rules without counters are left out."""
    tables: list[_Table] = []
    cur: _Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            cur = _Table(line[1:].strip())
            tables.append(cur)
        elif cur is None or not line or line[0] == "#" or line == "COMMIT":
            continue
        elif line[0] == ":":
            m = _IPT_CHAIN.fullmatch(line)
            if m and m.group(2) != "-":  # a built-in chain: its policy has a counter
                chain, policy = m.group(1), m.group(2)
                cur.hooks[chain] = chain
                if m.group(3) is not None:
                    key = f"policy of chain {chain}"  # the same key if the policy changes
                    shown = f"policy {policy} of chain {chain}"
                    cur.add(chain, key, int(m.group(3)), policy == "DROP", shown)
        else:
            m = _IPT_COUNTED.fullmatch(line)
            rule = m.group(2) if m else line
            parts = rule.split(None, 2)
            if len(parts) < 2 or parts[0] != "-A":
                continue
            bare = _QUOTED.sub('""', rule) if '"' in rule else rule
            targets = _IPT_JUMP.findall(bare)
            cur.jumps.setdefault(parts[1], set()).update(targets)
            if m is not None:
                drops = bool(targets) and targets[-1] in ("DROP", "REJECT")
                cur.add(parts[1], rule, int(m.group(1)), drops, rule)
    return tables


def parse_iptables_save_counters(text: str) -> dict[RuleKey, int]:
    """Packet counter of every rule and built-in chain policy in `iptables-save -c` text.

    Keys stay the same between two dumps of one ruleset; a policy's key does not name the
    policy (`policy of chain FORWARD`), rules' keys are their lines without the counter.
    """
    return {e.key: e.packets for t in _parse_iptables(text) for e in t.entries}


def _nft_rule(table: _Table, chain: str, line: str) -> None:
    """Record one rule of an nft chain: its jumps and, when counted, its counter."""
    table.jumps.setdefault(chain, set()).update(_unquote(t) for t in _NFT_TARGET.findall(line))
    if "@" in line:
        table.jumps[chain].update("@" + _unquote(r) for r in _NFT_REF.findall(line))
    m = _NFT_COUNTER.search(line)
    if m is None:
        return
    rule = " ".join((line[: m.start()] + line[m.end() :]).split())
    bare = _QUOTED.sub('""', rule) if '"' in rule else rule
    while "{" in bare and _NFT_BRACES.search(bare):
        bare = _NFT_BRACES.sub("", bare)
    bare = re.sub(r'\s*\bcomment ""$', "", bare)
    drops = _NFT_VERDICT.search(bare) is not None
    table.add(chain, rule, int(m.group(1)), drops, f"table {table.name} chain {chain}: {rule}")


def _parse_nft(text: str, skip: Iterable[tuple[str, str]]) -> list[_Table]:
    """The tables of `nft [-a] list ruleset` text, minus the (family, name) pairs in skip."""
    skipped = set(skip)
    tables: list[_Table] = []
    table: _Table | None = None
    block: tuple[str, str] | None = None  # ("chain" | "map" | "other", name)
    for _index, line in _nft_statements(text):
        head = _NFT_BLOCK.match(line)
        if table is None:
            if head and head.group(1) == "table":
                family, name = head.group(2) or "ip", _unquote(head.group(3))
                table = _Table(f"{family} {name}")
                if (family, name) not in skipped:
                    tables.append(table)
        elif block is None:
            if line == "}":
                table = None
            elif head and head.group(1) in ("chain", "map", "set"):
                block = (head.group(1), _unquote(head.group(3)))
            elif line.endswith("{"):
                block = ("other", "")
        elif line == "}":
            block = None
        elif block[0] in ("map", "set"):
            found = {_unquote(t) for t in _NFT_TARGET.findall(line)}
            table.maps.setdefault("@" + block[1], set()).update(found)
        elif block[0] == "chain":
            if line.startswith("type "):
                hook = _NFT_HOOK.search(line)
                if hook:
                    table.hooks[block[1]] = hook.group(1).upper()
            elif not line.startswith(("policy ", "comment ", "devices ")):
                _nft_rule(table, block[1], line)
    return tables


def parse_nft_counters(
    text: str, skip_tables: Iterable[tuple[str, str]] = ()
) -> dict[RuleKey, int]:
    """Packet counter of every rule with a `counter` in `nft -a list ruleset` text.

    Keys: ("FAMILY NAME", chain, rule text without counter and handle, occurrence).
    skip_tables: (family, name) tables to leave out (those iptables-nft owns).
    """
    return {e.key: e.packets for t in _parse_nft(text, skip_tables) for e in t.entries}


def _texts(dump: Dump) -> tuple[str, str]:
    return (dump, "") if isinstance(dump, str) else dump


def _owned_by_iptables(ipt: str, nft: str) -> set[tuple[str, str]]:
    """nft tables that iptables-save already shows (so they are not counted twice)."""
    owned = set(nft_tables_owned_by_iptables(nft))
    if "(nf_tables)" in ipt.split("\n", 1)[0]:
        owned |= {(fam, t) for fam in ("ip", "ip6") for t in IPTABLES_TABLES}
    return owned


def drops_between(before: Dump, after: Dump) -> tuple[RuleDrop, ...]:
    """DROP/REJECT rules and DROP policies whose packet counter rose from before to after.

    A dump is iptables-save -c text or (that text, nft -a list ruleset text). packets is the
    rise; a rule new in after counts from 0, and a counter that went down (the rule was
    re-created, e.g. by a kube-proxy sync) counts what it holds now, a lower bound. Most
    packets first, then in the order of after.
    """
    b_ipt, b_nft = _texts(before)
    a_ipt, a_nft = _texts(after)
    skip = _owned_by_iptables(b_ipt, b_nft) | _owned_by_iptables(a_ipt, a_nft)
    old = {**parse_iptables_save_counters(b_ipt), **parse_nft_counters(b_nft, skip)}
    found: list[tuple[int, RuleDrop]] = []
    for table in _parse_iptables(a_ipt) + _parse_nft(a_nft, skip):
        for e in table.entries:
            prev = old.get(e.key, 0)
            rise = e.packets - prev if e.packets >= prev else e.packets
            if e.drops and rise > 0:
                drop = RuleDrop(table.name, e.chain, e.rule, rise, table.hook_of(e.chain))
                found.append((len(found), drop))
    found.sort(key=lambda x: (-x[1].packets, x[0]))
    return tuple(d for _n, d in found)


def _dump(argv: list[str]) -> str:
    """stdout of a read-only rules dump ("" when the tool is missing, fails or hangs), with
    nft's warnings about iptables-nft tables kept as comments."""
    try:
        p = run_dump(argv)
    except (OSError, subprocess.SubprocessError):
        return ""
    if p.returncode != 0:
        return ""
    notes = [ln for ln in p.stderr.splitlines() if "managed by iptables-nft" in ln]
    return "".join(f"# {ln.lstrip('# ')}\n" for ln in notes) + p.stdout


def _read_in(netns_path: str, read: Callable[[], T], name: str) -> T | None:
    """read() run by a throwaway thread that setns()es into the namespace at netns_path (a
    few small reads); None when it cannot be entered or read."""
    try:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    result: list[T] = []

    def work() -> None:
        try:
            _setns(fd)
            result.append(read())
        except HairtraceError:
            return
        finally:
            os.close(fd)

    thread = threading.Thread(target=work, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:
        os.close(fd)
        return None
    thread.join(5)
    return result[0] if result else None


def sysctls_of(netns_path: str) -> dict[str, str | None] | None:
    """SYSCTL_KEYS of the namespace at netns_path; None when it cannot be read."""
    return _read_in(netns_path, read_sysctls, "sysctls")


def service_entries_of(netns_path: str) -> tuple[ServiceEntry, ...] | None:
    """Every Service port kube-proxy's rules in the namespace at netns_path define; None
    when it has no kube-proxy rules or cannot be read."""
    return _read_in(netns_path, kube_service_entries, "services")


def collect_counters(netns_path: str) -> tuple[str, str]:
    """(`iptables-save -c`, `nft -a list ruleset`) text of the namespace at netns_path.

    Read by a throwaway thread that setns()es, so the caller's thread never changes
    namespace. Anything that goes wrong (namespace gone, tool missing or failing) gives "".
    """
    try:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "", ""
    result: list[tuple[str, str]] = []

    def work() -> None:
        try:
            _setns(fd)
        except HairtraceError:
            return
        finally:
            os.close(fd)
        result.append((_dump(["iptables-save", "-c"]), _dump(["nft", "-a", "list", "ruleset"])))

    thread = threading.Thread(target=work, name="counters", daemon=True)
    try:
        thread.start()
    except RuntimeError:
        os.close(fd)
        return "", ""
    thread.join(2 * CMD_TIMEOUT_S + 5)
    return result[0] if result else ("", "")


def read_conntrack(proc: str = "/proc") -> tuple[int, int, dict[str, int]] | None:
    """(nf_conntrack_count, nf_conntrack_max, the stat counters summed over CPUs) as seen
    by the calling thread; None where conntrack is absent."""
    try:
        count = int(Path(f"{proc}/sys/net/netfilter/nf_conntrack_count").read_text())
        limit = int(Path(f"{proc}/sys/net/netfilter/nf_conntrack_max").read_text())
        # /proc/net is the process's netns; thread-self/net the calling thread's (setns)
        lines = Path(f"{proc}/thread-self/net/stat/nf_conntrack").read_text().split("\n")
    except (OSError, ValueError):
        return None
    names = lines[0].split()
    totals = dict.fromkeys(names, 0)
    for line in lines[1:]:
        for name, value in zip(names, line.split(), strict=False):
            totals[name] += int(value, 16)
    return count, limit, totals


def conntrack_of(netns_path: str) -> tuple[int, int, dict[str, int]] | None:
    """read_conntrack() inside the namespace at netns_path."""
    return _read_in(netns_path, read_conntrack, "conntrack")


def conntrack_between(
    before: tuple[int, int, dict[str, int]] | None, after: tuple[int, int, dict[str, int]] | None
) -> ConntrackStats | None:
    """The table now (after) and how much its counters rose since before."""
    if after is None:
        return None
    count, limit, now = after
    was = before[2] if before is not None else {}

    def rose(name: str) -> int:
        return max(0, now.get(name, 0) - was.get(name, 0))

    return ConntrackStats(count, limit, rose("insert_failed"), rose("drop"), rose("early_drop"))
