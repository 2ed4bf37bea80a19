"""Packets per second without and with something attached to the path, interleaved.

Each round measures the traffic alone and with the observer attached (started
before, stopped after), in alternating order; the row's value and baseline
are the medians of the rounds, so a drift of the lab's rate does not pass for
an overhead. The row also keeps each round's rate and ratio (with / without
of the same round): its spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from tracer.bench.rows import Row
from tracer.bench.traffic import Sample


class Observer(Protocol):
    """A tracer or capture on the path: start() returns once it is attached."""

    def start(self) -> None: ...

    def stop(self) -> dict[str, Any]: ...


@dataclass
class Comparison:
    without: list[Sample] = field(default_factory=list)
    with_: list[Sample] = field(default_factory=list)
    observed: list[dict[str, Any]] = field(default_factory=list)

    def row(self, template: Row, **detail: Any) -> Row:
        with_ = statistics.median(s.pps for s in self.with_)
        without = statistics.median(s.pps for s in self.without)
        return replace(
            template,
            value=round(with_),
            baseline=round(without),
            rounds=tuple(round(s.pps) for s in self.with_),
            round_ratios=self.ratios(),
            detail={
                "without": [s.to_dict() for s in self.without],
                "with": [s.to_dict() for s in self.with_],
                # what the observer adds to each packet's trip, on the sender's CPU
                "added_ns_per_packet": round(1e9 / with_ - 1e9 / without) if with_ else None,
                "observer": self.observed,
                **detail,
            },
        )

    def ratios(self) -> tuple[float, ...]:
        """with / without of each round (round i measured both, next to each other)."""
        return tuple(w.pps / o.pps for w, o in zip(self.with_, self.without, strict=False)
                     if o.pps)  # fmt: skip


def compare(
    traffic: Callable[[], Sample], observer: Callable[[], Observer], rounds: int
) -> Comparison:
    result = Comparison()
    for i in range(rounds):
        # without, with | with, without | ...: a steady drift cancels out
        if i % 2 == 0:
            result.without.append(traffic())
        obs = observer()
        obs.start()
        try:
            result.with_.append(traffic())
        finally:
            result.observed.append(obs.stop())
        if i % 2 == 1:
            result.without.append(traffic())
    return result
