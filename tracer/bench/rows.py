"""One benchmark result: a rate or ratio, the baseline it was measured against, the target.

A row always has either a value or an explicit reason why not (`na`), so a
reader (or a test) can tell "not measured" from "measured zero".
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
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
        }


def not_available(row: Row, why: str) -> Row:
    """The same row with no value and the reason."""
    return replace(row, value=None, baseline=None, na=why)
