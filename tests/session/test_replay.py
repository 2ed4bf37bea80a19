"""Replay: a session file gives what the live trace gave (report, verdicts, names)."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fixtures.loader import load
from tests.session.helpers import (
    DROP_REASONS,
    fixture_footer,
    fixture_header,
    fixture_run,
    records,
    write_fixture,
)
from tracer import __version__
from tracer.analysis import analyse
from tracer.analysis.context import RuleDrop
from tracer.present.report import build
from tracer.session import SessionWriter, replay
from tracer.session.replay import ReplayResult, footer_from_trace, header_from_trace
from tracer.trace import TraceResult


@pytest.mark.parametrize("name", ["seed-broken.json", "seed-healthy.json"])
def test_replay_report_equals_the_report_of_the_recorded_events(tmp_path: Path, name: str) -> None:
    path = tmp_path / "s.hts"
    fx = write_fixture(name, path, batch=8)
    live = build(fixture_run(fx), analyse(fx.events, fx.context()))
    res = replay(path)
    assert res.warnings == ()
    assert build(res.run, res.results) == live
    assert res.events == fx.events and res.records == records(fx)
    assert res.context == replace(fx.context(), names=res.context.names)
    assert res.topology == fx.topology
    assert res.run.tool_version == __version__ and res.header.hostname == "node-1"


def test_broken_replay_keeps_its_diagnosis(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    write_fixture("seed-broken.json", path)
    (conn, diag), *others = replay(path).results
    assert not others and diag.verdict == "broken" and diag.brk is not None
    assert (diag.brk.netns, diag.brk.dev, diag.brk.cause) == (
        "node",
        "cni0",
        "bridge-nf-call-iptables-off",
    )
    assert conn.backend == ("100.96.54.247", 80)


def test_unfinished_recording_replays_with_end_from_the_last_event(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    fx = write_fixture("seed-healthy.json", path, batch=10, footer=False)
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03")  # a chunk header cut short by SIGKILL
    res = replay(path)
    assert res.footer is None and len(res.warnings) == 2
    assert "cut off at byte" in res.warnings[0] and "has no footer" in res.warnings[1]
    last = max(ev.ts_ns for ev in fx.events)
    ctx = fx.context(end_ns=last, loss_windows=())
    assert res.context.end_ns == last
    got = build(res.run, res.results)["connections"]
    want = build(fixture_run(fx), analyse(fx.events, ctx))["connections"]
    # the same connections and verdicts; the one seen up to the end says it may miss events
    assert [c["verdict"] for c in got] == [c["verdict"] for c in want]
    assert [c["notes"][: len(w["notes"])] for c, w in zip(got, want, strict=True)] == [
        w["notes"] for w in want
    ]
    assert [{**c, "notes": []} for c in got] == [{**w, "notes": []} for w in want]
    assert any("has no footer" in c["notes"][-1] for c in got)
    assert res.run.command_status is None and res.run.lost_events is None


def test_final_topology_of_the_footer_names_things(tmp_path: Path) -> None:
    fx = load("seed-broken.json")
    final = replace(fx.topology, taken_at=fx.topology.taken_at + 4)
    path = tmp_path / "s.hts"
    with SessionWriter(path, fixture_header(fx)) as w:
        w.write_records(records(fx))
        w.close(fixture_footer(fx, topology=final))
    res = replay(path)
    assert res.topology == final and res.header.topology == fx.topology


def test_rule_drops_are_recorded_and_replayed(tmp_path: Path) -> None:
    fx = load("seed-broken.json")
    drops = (
        RuleDrop("filter", "KUBE-FORWARD", "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
                 3, "FORWARD"),
        RuleDrop("filter", "FORWARD", "policy DROP of chain FORWARD", 1, "FORWARD"),
    )  # fmt: skip
    run = replace(fixture_run(fx), rule_drops=drops)
    path = tmp_path / "s.hts"
    with SessionWriter(path, fixture_header(fx)) as w:
        w.write_records(records(fx))
        footer = footer_from_trace(
            run,
            end_ns=fx.raw["end_ns"],
            loss_windows=[tuple(w) for w in fx.raw["loss_windows"]],
            rule_drops_netns=4026531840,
        )
        w.close(footer)
    res = replay(path)
    assert (res.context.rule_drops, res.context.rule_drops_netns) == (drops, 4026531840)
    live_ctx = fx.context(rule_drops=drops, rule_drops_netns=4026531840)
    report = build(res.run, res.results)
    assert report == build(run, analyse(fx.events, live_ctx))
    assert report["rule_drops"] == [
        {"netns": "node", "table": "filter", "chain": "KUBE-FORWARD", "hook": "FORWARD",
         "rule": "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP", "packets": 3},
        {"netns": "node", "table": "filter", "chain": "FORWARD", "hook": "FORWARD",
         "rule": "policy DROP of chain FORWARD", "packets": 1},
    ]  # fmt: skip


def test_event_count_mismatch_is_a_warning(tmp_path: Path) -> None:
    fx = load("seed-broken.json")
    path = tmp_path / "s.hts"
    with SessionWriter(path, fixture_header(fx)) as w:
        w.write_records(records(fx)[:10])
        w.close(fixture_footer(fx))  # says 63
    assert replay(path).warnings == (
        f"session file {path}: the footer counts 63 events, the file holds 10",
    )


def test_trace_helpers_carry_every_run_field() -> None:
    fx = load("seed-broken.json")
    run = fixture_run(fx)
    h = header_from_trace(run, fx.topology, DROP_REASONS)
    assert h.hostname  # this host's name by default
    assert (h.kernel, h.provider, h.service_ip, h.service_port, h.netns) == (
        run.kernel, run.provider, run.service_ip, run.service_port, run.netns,
    )  # fmt: skip
    assert (h.attached, h.skipped, h.command, h.start_ns, h.started_at) == (
        run.attached, run.skipped, run.command, run.start_ns, run.started_at,
    )  # fmt: skip
    f = footer_from_trace(run, end_ns=9, loss_windows=[(1, 2)])
    assert (f.end_ns, f.events, f.loss_windows, f.command_status, f.topology) == (
        9, 63, ((1, 2),), 28, None,
    )  # fmt: skip


def test_replay_result_has_the_attributes_of_a_trace_result() -> None:
    # chunks: the raw batches TraceResult.records (a property) is built from
    live = {f.name for f in dataclasses.fields(TraceResult)} - {"chunks"} | {"records"}
    assert isinstance(TraceResult.records, property)
    assert live <= {f.name for f in dataclasses.fields(ReplayResult)}
