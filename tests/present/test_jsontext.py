"""dumps_indented writes exactly what json.dumps(obj, indent=2) writes."""

from __future__ import annotations

import json
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest

from tracer.present.jsontext import dumps_indented
from tracer.present.report import build
from tracer.session import replay

FAULTS = Path(__file__).resolve().parent.parent / "fixtures" / "faults"


class Color(IntEnum):
    RED = 3


CASES: list[Any] = [
    {},
    [],
    "plain",
    7,
    None,
    {"a": [], "b": {}, "c": [[[]]], "d": ()},
    [1, -2, 2.5, -0.0, 1e300, float("nan"), float("inf"), float("-inf"), True, False, None],
    ["é ü \u2603 \U0001f600", 'quote " backslash \\ newline \n tab \t', "\x00\x1f"],
    {7: "int key", 2.5: "float key", True: "bool key", None: "null key", "s": Color.RED},
    {"x": [{"y": [1, {"z": None, "w": (1, "two")}]}], "n": Color.RED},
]


@pytest.mark.parametrize("obj", CASES)
def test_same_text_as_json(obj: Any) -> None:
    assert dumps_indented(obj) == json.dumps(obj, indent=2)


@pytest.mark.parametrize("name", ["two-node", "vxlan-fdb-missing", "bridge-nf-off"])
def test_same_text_for_reports(name: str) -> None:
    res = replay(FAULTS / f"{name}.hts")
    report = build(res.run, res.results)
    assert dumps_indented(report) == json.dumps(report, indent=2)


def test_what_json_refuses_is_refused() -> None:
    with pytest.raises(TypeError):
        dumps_indented({"a": {1, 2}})
