"""Which kernel functions exist and where (/proc/kallsyms): for function probes, and to
name the function an address (a drop location) lies in."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Symbols:
    """Text symbols of the running kernel: name -> module ("" for vmlinux)."""

    functions: dict[str, str]

    def module_of(self, name: str) -> str | None:
        return self.functions.get(name)


def load(names: set[str], path: Path = Path("/proc/kallsyms")) -> Symbols:
    """Only the wanted names are kept (kallsyms has ~200k lines)."""
    found: dict[str, str] = {}
    try:
        with path.open() as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in names and parts[1] in "tT":
                    found.setdefault(parts[2], parts[3].strip("[]") if len(parts) > 3 else "")
    except OSError:
        pass
    return Symbols(found)


@dataclass(frozen=True)
class TextMap:
    """Kernel text symbols sorted by address, to name the function an address lies in."""

    starts: tuple[int, ...]
    names: tuple[str, ...]

    MAX_OFFSET = 1 << 20  # farther than this past a symbol: not inside it (a gap, unknown text)

    def function_at(self, addr: int) -> str | None:
        """'name+0xoff' of the function holding addr; None when unknown."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr - self.starts[i] >= self.MAX_OFFSET:
            return None
        return f"{self.names[i]}+{addr - self.starts[i]:#x}"


def load_text(path: Path = Path("/proc/kallsyms")) -> TextMap:
    """Every text symbol with its address (about 120k on a distro kernel; read once, at the
    end of a trace). Empty where addresses are hidden (kptr_restrict shows them as 0)."""
    found: list[tuple[int, str]] = []
    try:
        with path.open() as fh:
            for line in fh:
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("t", "T"):
                    found.append((int(parts[0], 16), parts[2]))
    except (OSError, ValueError):
        return TextMap((), ())
    found = [f for f in found if f[0]]
    found.sort()
    return TextMap(tuple(a for a, _ in found), tuple(n for _, n in found))
