"""Picking a Service's NAT rules out of `iptables-save` and `nft list ruleset` text.

Pure text processing, no system access. The selection is: the rules (or nft map/set elements)
that mention the Service address (and, when a port is given, do not name another destination
port); every rule of the chains those reach through jumps and gotos, transitively
(KUBE-SVC-*, KUBE-SEP-*, KUBE-MARK-MASQ / service-*, endpoint-*, mark-for-masquerade); the
rules that lead into the chains holding a match (PREROUTING -> KUBE-SERVICES, or the rule
that looks up the matching map); and, when anything matched, the postrouting chains with
everything they reach (KUBE-POSTROUTING's MASQUERADE). Lines keep their order in the input.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

#: Table names iptables-nft creates; in `nft list ruleset` they duplicate iptables-save.
IPTABLES_TABLES = frozenset({"nat", "filter", "mangle", "raw", "security"})


def address_pattern(service_ip: str) -> re.Pattern[str]:
    """A regex finding the address as a whole token (10.96.0.1 but not 10.96.0.10)."""
    text = _canonical(service_ip)
    if ":" not in text:
        return re.compile(r"(?<![\d.])" + re.escape(text) + r"(?!\d|\.\d)")
    return re.compile(r"(?<![0-9A-Fa-f:])" + re.escape(text) + r"(?![0-9A-Fa-f:])")


def _canonical(service_ip: str) -> str:
    """The address as iptables-save and nft print it (IPv6 compressed)."""
    return ipaddress.ip_address(service_ip).compressed


def _port_in(spec: str, port: int, sep: str) -> bool | None:
    """Whether port is in a port list like "80,443,1000:2000" (sep is the range mark).

    None when spec holds no numeric port at all (a service name, a set reference).
    """
    found = False
    for part in re.split(r"[,\s{}]+", spec):
        if not part:
            continue
        lo, _, hi = part.partition(sep)
        if not lo.isdigit() or (hi and not hi.isdigit()):
            continue
        found = True
        if int(lo) <= port <= int(hi or lo):
            return True
    return False if found else None


def _iptables_port_ok(tokens: list[str], port: int | None) -> bool:
    """False when the rule's destination-port match excludes port."""
    if port is None:
        return True
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            hit = _port_in(tokens[i + 1], port, ":")
            negated = i > 0 and tokens[i - 1] == "!"
            if hit is not None and hit == negated:
                return False
    return True


def _nft_port_ok(text: str, port: int | None) -> bool:
    """False when an nft rule's dport match, or an element's port key, excludes port."""
    if port is None:
        return True
    for m in re.finditer(r"\bdport\s+(!=\s*)?(\{[^}]*\}|\S+)", text):
        hit = _port_in(m.group(2), port, "-")
        if hit is not None and hit == bool(m.group(1)):
            return False
    # A concatenated map key: "10.96.0.1 . tcp . 443 : goto service-..."
    key = text.split(" : ", 1)[0]
    if " . " in key:
        nums = [t for t in (p.strip() for p in key.split(" . ")) if re.fullmatch(r"\d+(-\d+)?", t)]
        if nums and not any(_port_in(n, port, "-") for n in nums):
            return False
    return True


def _split_tokens(line: str) -> list[str]:
    """Shell-like tokens of an iptables-save line (quoted comments kept whole)."""
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_IPT_TARGET = re.compile(r"\s(?:-j|--jump|-g|--goto)\s+(\S+)")


@dataclass(slots=True)
class _Rule:
    """One rule or element while selecting: where it came from and where it leads."""

    index: int
    chain: str  # chain name, or the set/map name for an element
    text: str  # the line to report
    body: str  # what is searched for the address and ports
    nft: bool = False
    element: bool = False
    # parsed from body on first use: a node can have tens of thousands of rules
    targets: tuple[str, ...] | None = None
    refs: tuple[str, ...] | None = None

    def jumps(self) -> tuple[str, ...]:
        """The chains this rule (or map element) jumps or goes to."""
        if self.targets is None:
            if self.nft:
                self.targets = tuple(_unquote(t) for t in _NFT_TARGET.findall(self.body))
            else:
                bare = _QUOTED.sub('""', self.body) if '"' in self.body else self.body
                self.targets = tuple(_IPT_TARGET.findall(bare))
        return self.targets

    def uses(self) -> tuple[str, ...]:
        """The named nft sets and maps this rule looks up (@name)."""
        if self.refs is None:
            found = _NFT_REF.findall(self.body) if self.nft and "@" in self.body else []
            self.refs = tuple(_unquote(t) for t in found)
        return self.refs


@dataclass
class _Table:
    """Rules of one table, grouped for the closure walk."""

    rules: list[_Rule] = field(default_factory=list)
    chains: set[str] = field(default_factory=set)
    postrouting: set[str] = field(default_factory=set)


# an IPv4 address as a whole token, not a network (10.96.0.0/12 is none)
_QUAD = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.]|/(?:[0-9]|[12]\d|3[01])\b)")


def range_matcher(
    network: str, prefix: int, addresses: Iterable[str] | None = None
) -> Callable[[str], bool]:
    """Whether a rule's text names an address of network/prefix (of addresses, when
    given: the range's Services), for the filters' `within`."""
    net = ipaddress.ip_network(f"{network}/{prefix}")
    only = None if addresses is None else frozenset(addresses)

    def match(body: str) -> bool:
        for a in _QUAD.findall(body):
            if only is not None:
                if a in only:
                    return True
                continue
            try:
                if ipaddress.ip_address(a) in net:
                    return True
            except ValueError:
                continue
        return False

    return match


def _select(
    table: _Table,
    service_ip: str,
    port: int | None,
    nft: bool,
    within: Callable[[str], bool] | None = None,
) -> list[_Rule]:
    """The rules of one table that the module docstring describes, in input order;
    within: a range's matcher (range_matcher) instead of the one address."""
    needle, pattern = _canonical(service_ip), address_pattern(service_ip)
    by_chain: dict[str, list[_Rule]] = {}
    for r in table.rules:
        if not r.element:
            by_chain.setdefault(r.chain, []).append(r)

    def port_ok(r: _Rule) -> bool:
        if nft:
            return _nft_port_ok(r.body, port)
        return _iptables_port_ok(_split_tokens(r.body), port)

    # The substring test first: it is much cheaper than the regex on large rulesets.
    if within is not None:
        matched = [r for r in table.rules if within(r.body) and port_ok(r)]
    else:
        matched = [
            r for r in table.rules if needle in r.body and pattern.search(r.body) and port_ok(r)
        ]
    if not matched:
        return []
    chosen: dict[int, _Rule] = {r.index: r for r in matched}

    # Upward: whoever leads into a chain (or uses a set/map) that holds a match.
    todo = [r.chain for r in matched]
    done_up: set[str] = set()
    while todo:
        name = todo.pop()
        if name in done_up:
            continue
        done_up.add(name)
        for r in table.rules:
            if r.element or name not in r.body:  # cheap test first
                continue
            if name in r.jumps() or name in r.uses():
                chosen.setdefault(r.index, r)
                todo.append(r.chain)

    # Downward: every rule of every chain reached from a match or from postrouting.
    todo = [t for r in matched for t in r.jumps()]
    todo += list(table.postrouting)
    done_down: set[str] = set()
    while todo:
        name = todo.pop()
        if name in done_down or name not in table.chains:
            continue
        done_down.add(name)
        for r in by_chain.get(name, []):
            chosen.setdefault(r.index, r)
            todo.extend(r.jumps())
    return [chosen[i] for i in sorted(chosen)]


def filter_iptables_save(
    text: str,
    service_ip: str,
    service_port: int | None,
    within: Callable[[str], bool] | None = None,
) -> tuple[str, ...]:
    """The `-A ...` lines of iptables-save output that concern the Service (see module doc);
    within: a range's matcher (range_matcher), for every Service in it."""
    _canonical(service_ip)  # ValueError now for a bad address, whatever the text
    tables: list[_Table] = []
    cur: _Table | None = None
    for index, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if line.startswith("*"):
            cur = _Table()
            tables.append(cur)
        elif cur is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            cur.chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            parts = line.split(None, 2)
            if len(parts) >= 2:
                # jumps are parsed only for the rules the walk visits: nodes have many rules
                cur.rules.append(_Rule(index, parts[1], line, line))
    out: list[str] = []
    for t in tables:
        if "POSTROUTING" in t.chains:
            t.postrouting.add("POSTROUTING")
        out.extend(r.text for r in _select(t, service_ip, service_port, False, within))
    return tuple(out)


def _brace_delta(s: str) -> int:
    """Opening minus closing braces in s, outside double-quoted strings."""
    if '"' not in s:
        return s.count("{") - s.count("}")
    depth = 0
    quoted = False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "{":
            depth += 1
        elif not quoted and ch == "}":
            depth -= 1
    return depth


def _split_elements(body: str) -> list[str]:
    """The comma-separated items of an nft `elements = { ... }` body."""
    if not any(c in body for c in '"{('):
        return [" ".join(i.split()) for i in body.split(",") if i.strip()]
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    quoted = False
    for ch in body:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "{(":
            depth += 1
        elif not quoted and ch in "})":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            items.append(" ".join("".join(cur).split()))
            cur = []
            continue
        cur.append(ch)
    last = " ".join("".join(cur).split())
    if last:
        items.append(last)
    return [i for i in items if i]


_NFT_TARGET = re.compile(r'\b(?:jump|goto)\s+("[^"]+"|[^\s,;{}]+)')
_NFT_HOOK = re.compile(r"type\s+\w+\s+hook\s+")
_NFT_POSTROUTING = re.compile(r"\bhook\s+postrouting\b")
_NFT_REF = re.compile(r'(?<![\w@])@("[^"]+"|[\w.\-/]+)')


_PER_LINE = 1_000_000  # order key: line number * _PER_LINE + element number


def _unquote(name: str) -> str:
    """An nft identifier without its double quotes."""
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == '"' else name


_NFT_BLOCK = re.compile(
    r"(table|chain|set|map|flowtable|counter|quota|limit|secmark|synproxy|tunnel|ct\s+\w+)"
    r'\s+(?:(\S+)\s+)?("[^"]+"|\S+)\s*\{$'
)


def _strip_comment(line: str) -> str:
    """line without a trailing `# ...` remark (outside quotes), stripped."""
    if "#" not in line:
        return line.strip()
    quoted = False
    for n, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:n].strip()
    return line.strip()


def _nft_statements(text: str) -> Iterable[tuple[int, str]]:
    """(line number, statement) of nft text, a statement spread over lines joined into one."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        index, line = i, _strip_comment(lines[i])
        i += 1
        if not _NFT_BLOCK.match(line):
            depth = _brace_delta(line)
            if depth > 0:
                parts = [line]
                while depth > 0 and i < len(lines):
                    more = _strip_comment(lines[i])
                    i += 1
                    depth += _brace_delta(more)
                    parts.append(more)
                line = " ".join(parts)
        if line:
            yield index, line


def _parse_nft(text: str, skip: Iterable[tuple[str, str]]) -> list[tuple[str, str, _Table]]:
    """(family, table name, rules) of each table in `nft list ruleset` text, minus skip."""
    skipped = set(skip)
    tables: list[tuple[str, str, _Table]] = []
    table: _Table | None = None
    family = tname = ""
    block: tuple[str, str] | None = None  # ("chain" | "set" | "other", name)
    for index, line in _nft_statements(text):
        head = _NFT_BLOCK.match(line)
        if table is None:
            if head and head.group(1) == "table":
                family, tname = head.group(2) or "ip", _unquote(head.group(3))
                table = _Table()
                if (family, tname) not in skipped:
                    tables.append((family, tname, table))
            continue
        if block is None:
            if line == "}":
                table = None
            elif head and head.group(1) == "chain":
                block = ("chain", _unquote(head.group(3)))
                table.chains.add(block[1])
            elif head and head.group(1) in ("set", "map"):
                block = ("set", _unquote(head.group(3)))
            elif line.endswith("{"):
                block = ("other", "")
            continue
        if line == "}":
            block = None
            continue
        kind, name = block
        if kind == "chain":
            if line.startswith("type ") and _NFT_HOOK.match(line):
                if _NFT_POSTROUTING.search(line):
                    table.postrouting.add(name)
                continue
            if line.startswith(("comment ", "policy ", "devices ")):
                continue
            text = f"add rule {family} {tname} {name} {line}"
            table.rules.append(_Rule(index * _PER_LINE, name, text, line, nft=True))
        elif kind == "set" and line.startswith("elements"):
            body = line.split("=", 1)[1].strip()
            if body.startswith("{") and body.endswith("}"):
                body = body[1:-1]
            for n, el in enumerate(_split_elements(body)):
                text = f"add element {family} {tname} {name} {{ {el} }}"
                table.rules.append(
                    _Rule(index * _PER_LINE + n, name, text, el, nft=True, element=True)
                )
    return tables


def nft_tables_owned_by_iptables(stderr: str) -> frozenset[tuple[str, str]]:
    """(family, table) pairs nft warns are managed by iptables-nft."""
    return frozenset(
        (m.group(1), m.group(2))
        for m in re.finditer(r"table (\S+) (\S+) is managed by iptables-nft", stderr)
    )


def filter_nft_ruleset(
    text: str,
    service_ip: str,
    service_port: int | None,
    skip_tables: Iterable[tuple[str, str]] = (),
    within: Callable[[str], bool] | None = None,
) -> tuple[str, ...]:
    """The nft rules and map/set elements that concern the Service, as nft commands.

    skip_tables lists (family, name) tables to ignore, e.g. those iptables-nft owns, which
    iptables-save already reported.
    """
    _canonical(service_ip)  # ValueError now for a bad address, whatever the text
    picked: list[_Rule] = []
    for _family, _name, table in _parse_nft(text, skip_tables):
        picked.extend(_select(table, service_ip, service_port, True, within))
    picked.sort(key=lambda r: r.index)
    return tuple(r.text for r in picked)
