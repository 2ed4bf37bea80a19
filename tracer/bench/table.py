"""The bench's one table: measurement, value, baseline, ratio, spread, target, met.

Spread is over the row's rounds: the per-round ratio's [min..max] for rows whose
baseline was measured in the same rounds, else the value's +- half its range
(as % of the value), and n, the rounds. Each section's heading says the
machine's load while it ran; n/a reasons and notes are numbered below.
"""

from __future__ import annotations

from typing import Any

from tracer.bench.load import describe, merge

HEADER = ("measurement", "value", "baseline", "ratio", "spread (rounds)", "target", "met")


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
    if unit in ("ns", "runs"):
        return f"{value:.1f} {unit}"
    if unit == "MiB":
        return f"{value:.1f} {unit}"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{value:g} {unit}"


def spread_text(spread: dict[str, Any] | None) -> str:
    """'[0.76..0.81] n=3' (ratio per round), '+-4.1 % n=5' (value), 'n=1'."""
    if not spread:
        return "-"
    n = spread["n"]
    if n < 2:
        return f"n={n}"
    if spread.get("ratios") and len(spread["ratios"]) >= 2:
        return f"[{spread['ratio_min']:.2f}..{spread['ratio_max']:.2f}] n={n}"
    if spread.get("rel") is None:
        return f"n={n}"
    return f"±{50 * spread['rel']:.1f} % n={n}"


def _met(met: bool | None, target: Any) -> str:
    if target is None:
        return "-"
    return {True: "met", False: "NOT met", None: "n/a"}[met]


def render(doc: dict[str, Any]) -> str:
    """Rows grouped by section; baseline names, n/a reasons and notes as numbered notes."""
    groups: list[tuple[str, list[dict[str, Any]], list[list[str]]]] = []  # heading, rows, cells
    notes: list[str] = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"({notes.index(text) + 1})"

    for r in doc["rows"]:
        if not groups or groups[-1][0] != r["section"]:
            groups.append((r["section"], [], []))
        marks = [note(f"n/a: {r['na']}")] if r["na"] else []
        if r.get("note"):
            marks.append(note(r["note"]))
        base = fmt(r["baseline"], r["unit"]) if r["baseline"] is not None else "-"
        if r["baseline"] is not None and r["baseline_name"]:
            base += f" ({r['baseline_name']})"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        target = r["target"]["text"] if r["target"] else "-"
        groups[-1][1].append(r)
        groups[-1][2].append(["  " + " ".join([r["name"], *marks]), fmt(r["value"], r["unit"]),
                              base, ratio, spread_text(r.get("spread")), target,
                              _met(r["met"], r["target"])])  # fmt: skip
    body = [list(HEADER), *(cells for _h, _r, group in groups for cells in group)]
    widths = [max(len(row[i]) for row in body) for i in range(len(HEADER))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    title = (
        f"hairtrace bench ({doc['mode']}), kernel {doc['kernel']}, {doc['cpus']} CPUs, "
        f"{doc['seconds']:.0f} s"
    )
    if doc.get("loadavg"):
        before, after = doc["loadavg"]
        title += f", load average {before:.2f} -> {after:.2f}"
    out = [title, line(list(HEADER)), line(["-" * w for w in widths])]
    for heading, rows, group in groups:
        loads = merge(_distinct([r["load"] for r in rows if r.get("load")]))
        out.append(f"[{heading}]" + (f"  {describe(loads)}" if loads else ""))
        out += [line(cells) for cells in group]
    out += [f"({i}) {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(out)


def _distinct(loads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each section's load once (its rows share it), in order."""
    out: list[dict[str, Any]] = []
    for x in loads:
        if x not in out:
            out.append(x)
    return out
