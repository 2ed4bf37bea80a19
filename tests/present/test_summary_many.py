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


def test_a_hundred_thousand_connections_stay_readable() -> None:
    """100 k connections (a tenth broken the same way): the table lists a bounded number
    of rows, the tally counts every one by verdict, cause and backend, the break is shown
    once with its count; the digest keeps a bounded number of connections."""
    res = replay(FAULTS / "vxlan-fdb-missing.hts")
    ok = [r for r in res.results if r[1].verdict == "ok"]
    bad = [r for r in res.results if r[1].verdict == "broken"]
    digest = live.new_digest()
    n = 100_000
    for i in range(n):
        conn, diag = bad[i % len(bad)] if i % 10 == 0 else ok[i % len(ok)]
        digest.add((i,), conn, diag)
    assert len(digest.results) <= live.MAX_ROWS + live.MAX_BAD_ROWS
    out = io.StringIO()
    live.render_digest(res.run, digest, Console(file=out, width=200))
    text = out.getvalue()
    assert f"{n} connection(s): 10000 broken, 90000 ok" in text
    assert "causes: overlay-no-remote 10000" in text
    assert text.count("overlay-no-remote  (") == 1  # one panel
    assert "9999 more connection(s) broken the same way: overlay-no-remote" in text
    shown, hidden = digest.shown()
    assert len(shown) == live.MAX_BAD_ROWS and hidden == n - len(shown)
    assert f"and {n - 10_000} more ok and {10_000 - live.MAX_BAD_ROWS} more not ok" in text
    assert len(text.splitlines()) < 4 * (live.MAX_ROWS + live.MAX_BAD_ROWS)
