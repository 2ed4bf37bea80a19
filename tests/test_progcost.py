"""The program-cost rows: BPF stats turned into ns per run and runs per packet."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tracer.bench import progcost


def test_ns_per_run_over_the_programs_of_a_kind() -> None:
    before = {"ht_dev_rx": (1_000, 10), "ht_dev_tx": (0, 0), "ht_nf_pre_ct": (500, 5)}
    after = {"ht_dev_rx": (31_000, 1_010), "ht_dev_tx": (40_000, 1_000), "ht_nf_pre_ct": (500, 5)}
    delta = progcost._delta(after, before)
    ns, runs = progcost.per_run(delta, list(progcost.DEVICE))
    assert runs == 2_000 and ns == pytest.approx(70_000 / 2_000)
    assert progcost.per_run(delta, ["ht_nf_pre_ct"]) == (None, 0)  # it never ran meanwhile


def test_program_stats_reads_bpftool(monkeypatch: pytest.MonkeyPatch) -> None:
    progs = [
        {"name": "ht_dev_rx", "run_time_ns": 300, "run_cnt": 3},
        {"name": "ht_dev_rx", "run_time_ns": 100, "run_cnt": 1},  # two tracers: summed
        {"name": "sd_fw_egress"},  # not hairtrace's, no stats
    ]

    def run(argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        assert argv[:3] == ["bpftool", "-j", "prog"]
        return subprocess.CompletedProcess(argv, 0, json.dumps(progs), "")

    monkeypatch.setattr(progcost.subprocess, "run", run)
    assert progcost.program_stats() == {"ht_dev_rx": (400, 4)}


def test_every_row_has_a_stable_id() -> None:
    ids = [r.id for r in progcost.template()]
    assert len(ids) == len(set(ids)) == 5
    assert all(i.startswith("progcost.") for i in ids)
