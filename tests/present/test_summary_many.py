"""The end-of-trace summary stays readable with many connections: ok rows are tallied
past a limit, repeated identical breaks are counted instead of printed again."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from tracer.present import live
from tracer.session import replay

FAULTS = Path(__file__).resolve().parent.parent / "fixtures" / "faults"


def _render(name: str) -> str:
    out = io.StringIO()
    live.render_summary(replay(FAULTS / f"{name}.hts"), Console(file=out, width=200))
    return out.getvalue()


def test_ok_rows_past_the_limit_are_tallied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "MAX_ROWS", 2)
    text = _render("two-node")  # four ok connections
    assert "and 2 more ok connection(s) not listed" in text
    assert text.count("100.96.54.240:") == 2  # only two client rows listed
    assert "4 connection(s): 4 ok; backends:" in text


def test_broken_rows_are_always_listed_and_same_breaks_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(live, "MAX_ROWS", 1)
    text = _render("vxlan-fdb-missing")  # 4 broken the same way, 2 ok
    assert text.count("overlay-no-remote  (") == 1  # one panel
    assert "3 more connection(s) broken the same way: overlay-no-remote" in text
    assert text.count("): overlay-no-remote") + text.count("(kfree_skb):") >= 4
    assert "and 2 more ok connection(s) not listed" in text
