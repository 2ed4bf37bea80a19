"""The bench's one table: measurement, value, baseline, ratio, target, met; n/a reasons below."""

from __future__ import annotations

from typing import Any

HEADER = ("measurement", "value", "baseline", "ratio", "target", "met")


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in ("ev/s", "pps", "pkt/s"):
        for scale, prefix in ((1e6, "M"), (1e3, "k")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {prefix}{unit}"
        return f"{value:.0f} {unit}"
    if unit in ("ev", "conn", "conn/s"):
        return f"{value:,.0f} {unit}"
    if unit == "MiB":
        return f"{value:.1f} {unit}"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{value:g} {unit}"


def _met(met: bool | None, target: Any) -> str:
    if target is None:
        return "-"
    return {True: "met", False: "NOT met", None: "n/a"}[met]


def render(doc: dict[str, Any]) -> str:
    """Rows grouped by section; baseline names and n/a reasons as numbered notes."""
    lines: list[list[str]] = []
    notes: list[str] = []
    section = None
    for r in doc["rows"]:
        if r["section"] != section:
            section = r["section"]
            lines.append([f"[{section}]", "", "", "", "", ""])
        name = r["name"]
        if r["na"]:
            notes.append(f"n/a: {r['na']}")
            name += f" ({len(notes)})"
        base = fmt(r["baseline"], r["unit"]) if r["baseline"] is not None else "-"
        if r["baseline"] is not None and r["baseline_name"]:
            base += f" ({r['baseline_name']})"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        target = r["target"]["text"] if r["target"] else "-"
        lines.append(["  " + name, fmt(r["value"], r["unit"]), base, ratio, target,
                      _met(r["met"], r["target"])])  # fmt: skip
    widths = [max(len(row[i]) for row in [list(HEADER), *lines]) for i in range(len(HEADER))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    title = (
        f"hairtrace bench ({doc['mode']}), kernel {doc['kernel']}, {doc['cpus']} CPUs, "
        f"{doc['seconds']:.0f} s"
    )
    if doc.get("loadavg"):
        before, after = doc["loadavg"]
        title += f", load average {before:.2f} -> {after:.2f}"
    out = [
        title,
        line(list(HEADER)),
        line(["-" * w for w in widths]),
        *(line(cells) for cells in lines),
    ]
    out += [f"({i}) {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(out)
