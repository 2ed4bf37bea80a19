"""scripts/bench: every row measured or explained, the JSON shape, nothing left behind.

The live test runs `scripts/bench --short` as CI would (root, BPF, network
namespaces, bpftrace and tcpdump installed by scripts/setup). No speed is
asserted anywhere: only that each row has a number or an n/a reason.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tracer.bench.rows import Row, Target, not_available
from tracer.bench.runner import SCHEMA, all_rows
from tracer.bench.table import fmt, render

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
BENCH_OBJECT = ROOT / "bpf" / "build" / "bench.bpf.o"
ROW_KEYS = {"id", "section", "name", "unit", "value", "baseline", "baseline_name", "ratio",
            "target", "met", "na", "detail"}  # fmt: skip


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _hb_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith("hb-")]


def _bench_processes() -> list[str]:
    """Command lines still running from the bench's temporary helpers directory."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "hairtrace-bench-" in text:
            found.append(text)
    return found


@pytest.mark.live
@pytest.mark.needs_binary("ip", "iptables", "clang", "bpftrace", "tcpdump")
def test_bench_short_has_every_row(tmp_path: Path, require) -> None:  # type: ignore[no-untyped-def]
    require(BENCH_OBJECT.is_file(), f"{BENCH_OBJECT} not built (make -C bpf)")
    require(not _hb_netns(), "hb-* namespaces exist already (another bench running?)")
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [str(BENCH), "--short", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA
    assert doc["mode"] == "short"
    assert _number(doc["seconds"]) and doc["cpus"] >= 1
    ids = [r["id"] for r in doc["rows"]]
    assert ids == [r.id for r in all_rows()]
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS, row["id"]
        if row["na"] is None:
            assert _number(row["value"]), row
        else:
            assert row["value"] is None and isinstance(row["na"], str) and row["na"], row
        for key in ("baseline", "ratio"):
            assert row[key] is None or _number(row[key]), (row["id"], key)
        assert row["met"] in (True, False, None)
        if row["target"] is not None:
            assert set(row["target"]) == {"on", "op", "bound", "text"}
        else:
            assert row["met"] is None
        assert isinstance(row["detail"], dict)
    # overload: the paused tracer's ring overflowed; every loss is counted per
    # probe point and every connection it reported is incomplete
    by_id = {r["id"]: r for r in doc["rows"]}
    lost, incomplete = by_id["overload.lost"], by_id["overload.incomplete"]
    assert lost["value"] > 0, lost
    assert sum(lost["detail"]["lost_by_point"].values()) == lost["value"], lost
    assert 0 < incomplete["value"] == incomplete["baseline"], incomplete
    # the one table: every row's name on stdout
    for row in doc["rows"]:
        assert row["name"] in res.stdout
    assert not _hb_netns()
    assert not _bench_processes()


def test_target_checks_value_or_ratio() -> None:
    at_least = Target("ratio", ">=", 0.8, ">= 0.8 x")
    below = Target("value", "<", 0.5, "< 0.5 s")
    row = Row("x", "s", "n", "pps", value=90.0, baseline=100.0, target=at_least)
    assert row.ratio == pytest.approx(0.9) and row.met is True
    assert Row("x", "s", "n", "s", value=0.7, target=below).met is False
    assert not_available(row, "why").met is None
    assert Row("x", "s", "n", "s", value=1.0).met is None


def test_table_names_na_reasons() -> None:
    rows = [
        Row(
            "a.b", "sec", "first", "ev/s", value=1_500_000.0, target=Target("value", ">=", 1e6, "t")
        ),
        not_available(Row("a.c", "sec", "second", "pps"), "because"),
    ]
    doc = {"mode": "short", "kernel": "k", "cpus": 2, "seconds": 1.0,
           "rows": [r.to_dict() for r in rows]}  # fmt: skip
    text = render(doc)
    assert "1.50 Mev/s" in text and "met" in text
    assert "second (1)" in text and "(1) n/a: because" in text
    assert fmt(None, "s") == "n/a" and fmt(0.4321, "s") == "0.432 s"


def test_bench_ab_needs_a_built_checkout(tmp_path: Path) -> None:
    from tracer.bench.ab import variants
    from tracer.errors import HairtraceError

    with pytest.raises(HairtraceError, match="not a hairtrace checkout"):
        variants(tmp_path)
    (tmp_path / "tracer").mkdir()
    (tmp_path / "tracer" / "cli.py").write_text("")
    with pytest.raises(HairtraceError, match="not built"):
        variants(tmp_path)
    (tmp_path / "bpf" / "build").mkdir(parents=True)
    (tmp_path / "bpf" / "build" / "hairtrace.bpf.o").write_bytes(b"")
    before, after, every, tcp_only = variants(tmp_path)
    assert before.environ is not None and before.environ["PYTHONPATH"] == str(tmp_path)
    assert after.environ is None and every.extra == ("--data-packets", "0")
    # the cost of tracing UDP: the same checkout tracing TCP only
    assert tcp_only.environ is None and tcp_only.svc.endswith("/tcp") and not tcp_only.extra
