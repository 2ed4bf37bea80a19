"""scripts/bench: every row measured or explained, the JSON shape, nothing left behind.

The live test runs `scripts/bench --short` as CI would (root, BPF, network
namespaces, bpftrace and tcpdump installed by scripts/setup). No speed is
asserted anywhere: only that each row has a number or an n/a reason.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tracer.bench import load, peers, pipeline
from tracer.bench.compare import Comparison
from tracer.bench.context import StopRequest
from tracer.bench.rows import Row, Target, not_available
from tracer.bench.runner import SCHEMA, Section, _run_section, all_rows
from tracer.bench.table import fmt, render, spread_text
from tracer.bench.traffic import Sample
from tracer.errors import HairtraceError

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
BENCH_OBJECT = ROOT / "bpf" / "build" / "bench.bpf.o"
ROW_KEYS = {"id", "section", "name", "unit", "value", "baseline", "baseline_name", "ratio",
            "target", "met", "na", "detail", "spread", "note", "load"}  # fmt: skip
LOAD_KEYS = {"seconds", "loadavg", "bench_cpu", "others_cpu", "kernel_threads_cpu", "steal_cpu"}


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


def _tracefs_mounts() -> list[str]:
    return [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if " tracefs " in ln]


@pytest.mark.live
@pytest.mark.needs_binary("ip", "iptables", "clang", "bpftrace", "tcpdump")
def test_bench_short_has_every_row(tmp_path: Path, require) -> None:  # type: ignore[no-untyped-def]
    require(BENCH_OBJECT.is_file(), f"{BENCH_OBJECT} not built (make -C bpf)")
    require(not _hb_netns(), "hb-* namespaces exist already (another bench running?)")
    out = tmp_path / "bench.json"
    tracefs_before = _tracefs_mounts()
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
        # every measured row has its spread over its rounds (n >= 1), every row its load
        if row["na"] is None:
            spread = row["spread"]
            assert spread["n"] >= 1 and spread["min"] <= row["value"] <= spread["max"], row
        else:
            assert row["spread"] is None, row
        assert set(row["load"]) == LOAD_KEYS, row["id"]
    # the peers' rows are there even on a machine without tracefs (the bench mounts it)
    by_id = {r["id"]: r for r in doc["rows"]}
    assert by_id["peers.tcpdump_pps"]["na"] is None, by_id["peers.tcpdump_pps"]
    assert by_id["peers.bpftrace_pps"]["na"] is None, by_id["peers.bpftrace_pps"]
    # overload: the paused tracer's ring overflowed; every loss is counted per
    # probe point and every connection it reported is incomplete
    lost, incomplete = by_id["overload.lost"], by_id["overload.incomplete"]
    assert lost["value"] > 0, lost
    assert sum(lost["detail"]["lost_by_point"].values()) == lost["value"], lost
    assert 0 < incomplete["value"] == incomplete["baseline"], incomplete
    # the one table: every row's name on stdout
    for row in doc["rows"]:
        assert row["name"] in res.stdout
    assert not _hb_netns()
    assert not _bench_processes()
    assert _tracefs_mounts() == tracefs_before  # what the bench mounted is unmounted


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
    before, after, every, tcp_only, *_others = variants(tmp_path)
    assert before.environ is not None and before.environ["PYTHONPATH"] == str(tmp_path)
    assert after.environ is None and every.extra == ("--data-packets", "0")
    # the cost of tracing UDP: the same checkout tracing TCP only
    assert tcp_only.environ is None and tcp_only.svc.endswith("/tcp") and not tcp_only.extra


# --- spread over rounds, load, peers standing alone (no root, no lab) ---


def _samples(*pps: float) -> list[Sample]:
    return [Sample(p, int(p), 1.0) for p in pps]


def test_spread_from_interleaved_rounds() -> None:
    cmp = Comparison(without=_samples(100, 110, 90), with_=_samples(80, 99, 72),
                     observed=[{}, {}, {}])  # fmt: skip
    row = cmp.row(Row("p.x", "sec", "flood", "pps", baseline_name="no tracer"))
    assert row.value == 80 and row.baseline == 100  # medians
    assert row.rounds == (80, 99, 72)
    assert row.round_ratios == pytest.approx((0.80, 0.90, 0.80))
    d = row.to_dict()
    assert set(d) == ROW_KEYS
    spread = d["spread"]
    assert spread["n"] == 3 and spread["values"] == [80, 99, 72]
    assert (spread["min"], spread["max"]) == (72, 99)
    assert spread["rel"] == pytest.approx((99 - 72) / 80, abs=1e-4)
    assert (spread["ratio_min"], spread["ratio_max"]) == (0.8, 0.9)
    assert spread_text(spread) == "[0.80..0.90] n=3"
    # a value-only row: +- half the range, as % of the median
    timed = Row("s.x", "sec", "attach", "s", value=0.5, rounds=(0.45, 0.5, 0.55))
    assert spread_text(timed.spread()) == "±10.0 % n=3"


def test_row_measured_once_says_n1() -> None:
    once = Row("o.x", "sec", "once", "MiB", value=93.7)
    assert once.spread() == {"n": 1, "values": [93.7], "min": 93.7, "max": 93.7, "rel": 0.0}
    assert spread_text(once.spread()) == "n=1"
    gone = not_available(replace(once, rounds=(1.0, 2.0), round_ratios=(0.5,)), "why")
    assert gone.spread() is None and gone.rounds == () and gone.to_dict()["spread"] is None


def test_load_between_samples_counts_others_not_the_bench() -> None:
    a = load.Sample(at=10.0, loadavg=1.1, busy_s=100.0, steal_s=5.0, own_s=20.0, kthreads_s=1.0)
    b = load.Sample(at=20.0, loadavg=1.3, busy_s=117.0, steal_s=6.0, own_s=30.0, kthreads_s=3.0)
    got = load.between(a, b)
    assert set(got) == LOAD_KEYS
    # 17 CPU-seconds busy in 10 s, 10 of them the bench's, 2 kernel threads': others 0.5 CPU
    assert got["others_cpu"] == 0.5 and got["bench_cpu"] == 1.0 and got["steal_cpu"] == 0.1
    assert got["kernel_threads_cpu"] == 0.2
    assert got["loadavg"] == [1.1, 1.3]
    merged = load.merge([got, {**got, "seconds": 30.0, "others_cpu": 0.1,
                               "loadavg": [1.3, 2.0]}])  # fmt: skip
    assert merged is not None and merged["loadavg"] == [1.1, 2.0]
    assert merged["others_cpu"] == pytest.approx((0.5 * 10 + 0.1 * 30) / 40, abs=0.01)
    assert "other processes 0.50 CPU" in load.describe(got)
    real = load.sample()
    assert real.busy_s is not None and real.own_s > 0
    assert real.kthreads_s is not None and real.kthreads_s >= 0


class _FakeProcs:
    def stop_all(self) -> None:
        pass


class _FakeTraffic:
    def __init__(self) -> None:
        self.pps = iter(range(1000, 100_000, 1000))

    def udp(self, seconds: float) -> Sample:
        return Sample(float(next(self.pps)), 1, seconds)

    def forget(self) -> None:
        pass


def _fake_env() -> Any:
    return SimpleNamespace(seconds=1.0, rounds=2, traffic=_FakeTraffic(), procs=_FakeProcs(),
                           stop=StopRequest())  # fmt: skip


class _Fails:
    """A peer that cannot attach, with its own error."""

    def __init__(self, _env: Any, _n: int, error: str = "") -> None:
        self.error = error

    def start(self) -> None:
        raise HairtraceError(self.error)

    def stop(self) -> dict[str, Any]:
        raise AssertionError("never started")


def _counts(**counts: int) -> type:
    class Works:
        def __init__(self, _env: Any, _n: int) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self) -> dict[str, Any]:
            return dict(counts)

    return Works


def _peers_here(monkeypatch: pytest.MonkeyPatch, mounted: bool) -> list[str]:
    """Both peers installed and runnable; tracefs mounted or not; mount calls recorded."""
    calls: list[str] = []
    monkeypatch.setattr(peers, "_missing", lambda _tool: None)
    monkeypatch.setattr(peers, "_bpftrace_works", lambda: None)
    monkeypatch.setattr(peers, "tracefs_mounted", lambda: mounted)
    monkeypatch.setattr(peers, "mount_tracefs", lambda: calls.append("mount"))
    monkeypatch.setattr(peers, "umount_tracefs", lambda: calls.append("umount"))
    monkeypatch.setattr(peers, "Bpftrace", _counts(printed=900, lost=100))
    monkeypatch.setattr(peers, "Tcpdump", _counts(captured=500, received_by_filter=1000))
    return calls


BT_ERROR = "bpftrace exited (1): stdin:1:1-33: ERROR: tracepoint not found: net:netif_receive_skb"


def test_bpftrace_failing_leaves_tcpdump_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    _peers_here(monkeypatch, mounted=True)
    monkeypatch.setattr(peers, "Bpftrace", lambda env, n: _Fails(env, n, BT_ERROR))
    bt_pps, bt_printed, td_pps, td_captured = peers.measure(_fake_env())
    assert bt_pps.na == bt_printed.na == BT_ERROR
    assert td_pps.na is None and td_pps.value is not None and td_pps.spread()["n"] == 2
    assert td_captured.na is None and td_captured.value == 500
    assert td_captured.baseline == 1000 and td_captured.round_ratios == (0.5, 0.5)


def test_tcpdump_failing_leaves_bpftrace_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    _peers_here(monkeypatch, mounted=True)
    why = "tcpdump exited (1): tcpdump: any: No such device exists"
    monkeypatch.setattr(peers, "Tcpdump", lambda env, n: _Fails(env, n, why))
    bt_pps, bt_printed, td_pps, td_captured = peers.measure(_fake_env())
    assert td_pps.na == td_captured.na == why
    assert bt_pps.na is None and bt_printed.na is None
    assert bt_printed.value == 900 and bt_printed.baseline == 1000  # printed of offered
    assert bt_pps.note is None  # tracefs was there: nothing mounted, nothing to say


def test_tracefs_mounted_for_bpftrace_and_unmounted_after_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _peers_here(monkeypatch, mounted=False)

    class FailsAfterMount(_Fails):
        def start(self) -> None:
            calls.append("bpftrace")
            super().start()

    monkeypatch.setattr(peers, "Bpftrace", lambda env, n: FailsAfterMount(env, n, BT_ERROR))
    bt_pps, bt_printed, td_pps, _ = peers.measure(_fake_env())
    assert calls == ["mount", "bpftrace", "umount"]
    assert bt_pps.na == BT_ERROR and td_pps.na is None
    assert bt_pps.note is not None and "mounted it read-only" in bt_pps.note
    assert td_pps.note is None
    text = render({"mode": "short", "kernel": "k", "cpus": 2, "seconds": 1.0,
                   "rows": [r.to_dict() for r in (bt_pps, bt_printed, td_pps)]})  # fmt: skip
    # both bpftrace rows point at the same two notes, each printed once
    assert text.count("n/a: " + BT_ERROR) == 1 and text.count("mounted it read-only") == 1
    assert "bpftrace printing per event (1) (2)" in text


def test_tracefs_unmounted_when_the_bench_is_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _peers_here(monkeypatch, mounted=False)

    class Interrupted(_Fails):
        def start(self) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(peers, "Bpftrace", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        peers.measure(_fake_env())
    assert calls == ["mount", "umount"]


def test_tracefs_left_alone_when_there(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _peers_here(monkeypatch, mounted=True)
    peers.measure(_fake_env())
    assert calls == []


def test_section_rows_carry_load_and_table_prints_it() -> None:
    section = Section("fake", lambda: [Row("f.a", "fake", "a", "s"), Row("f.b", "fake", "b", "s")],
                      lambda _env: [Row("f.a", "fake", "a", "s", value=1.0)])  # fmt: skip
    rows = _run_section(section, _fake_env(), lambda _m: None)
    assert [r.id for r in rows] == ["f.a", "f.b"] and rows[1].na == "not measured"
    assert all(r.load is not None and set(r.load) == LOAD_KEYS for r in rows)
    doc = {"mode": "short", "kernel": "k", "cpus": 2, "seconds": 1.0,
           "rows": [r.to_dict() for r in rows]}  # fmt: skip
    heading = render(doc).splitlines()[3]
    assert heading.startswith("[fake]  load average ") and "other processes" in heading


def test_pipeline_rounds_give_value_spread_and_ratio() -> None:
    def step(rate: float, lost: int = 0, cpu: float = 50.0) -> pipeline.Step:
        return pipeline.Step(requested=rate, rate=rate, emitted=100, lost=lost, received=100,
                             cpu_percent=cpu, irq_work_per_event=None)  # fmt: skip

    lossless, cpu = (r for r in pipeline.template() if r.id.endswith("callback"))
    sweeps = [[step(1e6, cpu=40), step(4e6)], [step(1e6, cpu=60), step(4e6, lost=1)],
              [step(1e6, cpu=50), step(4e6)]]  # fmt: skip
    got, cpu_row, best_of, cpu_of = pipeline._rows(lossless, cpu, sweeps)
    assert got.value == 4e6 and got.rounds == (4e6, 1e6, 4e6) and best_of == [4e6, 1e6, 4e6]
    assert got.spread()["min"] == 1e6  # the round that lost at 4 M shows
    assert cpu_row.value == 50.0 and cpu_row.rounds == (40.0, 60.0, 50.0)
    assert cpu_of == [40.0, 60.0, 50.0]


def test_only_sections() -> None:
    assert [r.section for r in all_rows(["peers"])] == [peers.SECTION] * 4
    with pytest.raises(HairtraceError, match="no bench section nope"):
        all_rows(["nope"])
