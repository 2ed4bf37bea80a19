"""Which kernel functions exist and where (/proc/kallsyms), for function probes."""

from __future__ import annotations

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
