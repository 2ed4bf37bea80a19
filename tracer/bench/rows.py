"""One benchmark result: a rate or ratio, the baseline it was measured against, the target.

A row always has either a value or an explicit reason why not (`na`), so a
reader (or a test) can tell "not measured" from "measured zero". A measured row
also carries its value in each round (`rounds`, and value / baseline per round in
`round_ratios` where the baseline was measured in the same round): its spread, so
a reader can tell a regression from noise. A row measured once has one round.
"""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Target:
    """`on` ("value" or "ratio") compared with `bound` by `op`; `text` is what the table shows."""

    on: str
    op: str
    bound: float
    text: str

    def check(self, value: float | None, ratio: float | None) -> bool | None:
        x = value if self.on == "value" else ratio
        if x is None or math.isnan(x):
            return None
        return _OPS[self.op](x, self.bound)

    def to_dict(self) -> dict[str, Any]:
        return {"on": self.on, "op": self.op, "bound": self.bound, "text": self.text}


@dataclass(frozen=True)
class Row:
    """One line of the table. `ratio` is value / baseline when both exist."""

    id: str  # stable key, e.g. "pktrate.udp_untraced"
    section: str
    name: str
    unit: str
    value: float | None = None
    baseline: float | None = None
    baseline_name: str | None = None
    target: Target | None = None
    na: str | None = None  # why there is no value
    detail: dict[str, Any] = field(default_factory=dict)
    rounds: tuple[float, ...] = ()  # the value in each round; () = measured once (value)
    round_ratios: tuple[float, ...] = ()  # value / baseline in each round, when paired
    note: str | None = None  # a footnote that is not a failure (e.g. what the bench mounted)
    load: dict[str, Any] | None = None  # the machine while the row's section ran (runner)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None or self.na is not None:
            return None
        return self.target.check(self.value, self.ratio)

    def spread(self) -> dict[str, Any] | None:
        """Min and max over the rounds (of the value, and of the ratio when paired), n."""
        if self.value is None:
            return None
        values = list(self.rounds) or [self.value]
        out: dict[str, Any] = {"n": len(values), "values": values,
                               "min": min(values), "max": max(values),
                               "rel": _rel(values)}  # fmt: skip
        if self.round_ratios:
            ratios = [round(r, 4) for r in self.round_ratios]
            out |= {"ratios": ratios, "ratio_min": min(ratios), "ratio_max": max(ratios)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "value": self.value,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "target": self.target.to_dict() if self.target else None,
            "met": self.met,
            "na": self.na,
            "detail": self.detail,
            "spread": self.spread(),
            "note": self.note,
            "load": self.load,
        }


def _rel(values: list[float]) -> float | None:
    """(max - min) / median: the share of the value the rounds disagree by."""
    mid = statistics.median(values)
    return round((max(values) - min(values)) / abs(mid), 4) if mid else None


def not_available(row: Row, why: str) -> Row:
    """The same row with no value and the reason."""
    return replace(row, value=None, baseline=None, na=why, rounds=(), round_ratios=())
