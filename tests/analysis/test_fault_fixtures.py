"""Every fault of the catalogue, replayed from its recorded session (scripts/capture-faults):
the cause code, the place and the evidence the catalogue promises. No root, no kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault_cases import BROKEN, HEALTHY, WHERE, check_report
from tracer.lab.faults import FAULTS
from tracer.present.report import build
from tracer.session import replay

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "faults"


def _report(name: str) -> dict:  # type: ignore[type-arg]
    res = replay(FIXTURES / f"{name}.hts")
    assert not res.warnings, res.warnings
    return build(res.run, res.results)


def test_every_fault_has_a_fixture_and_an_expected_place() -> None:
    assert sorted(WHERE) == sorted(BROKEN)
    for name in FAULTS:
        assert (FIXTURES / f"{name}.hts").is_file(), f"run scripts/capture-faults {name}"


@pytest.mark.parametrize("name", BROKEN)
def test_fault_is_diagnosed_with_its_cause_and_place(name: str) -> None:
    check_report(name, _report(name))


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_variants_are_ok(name: str) -> None:
    report = _report(name)
    check_report(name, report)
    if name == "two-node":
        backends = {c["backend"]["ip"] for c in report["connections"]}
        assert backends & {"100.96.55.10", "100.96.55.11"}, "no connection crossed the VXLAN"


def test_no_fault_is_called_ok_nor_given_another_faults_cause() -> None:
    """Across the whole catalogue, a broken fixture never reads ok, and each cause code
    appears only in the fixture of the fault that has it."""
    seen: dict[str, set[str]] = {}
    for name in FAULTS:
        for c in _report(name)["connections"]:
            if c["break"]:
                seen.setdefault(c["break"]["cause"], set()).add(name)
    for cause, names in seen.items():
        assert names == {n for n, f in FAULTS.items() if f.cause == cause}, (cause, names)
