"""scripts/triage: the matrix and diffs from saved reports, a real host run, a real VM run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import needs_binary, needs_live

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "triage"
REPORTS = ROOT / "tests" / "fixtures" / "reports"
CAUSE = "bridge-nf-call-iptables-off"


def _load_script() -> ModuleType:
    loader = SourceFileLoader("hairtrace_triage", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = mod  # dataclasses look their module up there
    loader.exec_module(mod)
    return mod


triage = _load_script()


def report(name: str) -> dict[str, Any]:
    return json.loads((REPORTS / f"{name}.json").read_text())


def _runs(vm_broken: str = "vm-6.1-fentry-broken") -> list[Any]:
    Run, vm = triage.Run, "6.1.0-56-amd64"
    return [
        Run("host", "seed-broken", "auto", report("host-tracepoint-broken")),
        Run("host", "seed-healthy", "auto", report("host-tracepoint-healthy")),
        Run(vm, "seed-broken", "auto", report(vm_broken), spec="6.1.0-56"),
        Run(vm, "seed-healthy", "auto", report("vm-6.1-fentry-healthy"), spec="6.1.0-56"),
        Run(vm, "seed-broken", "kprobe", report("vm-6.1-kprobe-broken"), spec="6.1.0-56"),
        Run(vm, "seed-healthy", "kprobe", report("vm-6.1-kprobe-healthy"), spec="6.1.0-56"),
    ]


def _row(rows: list[dict[str, str]], kernel: str, scenario: str, provider: str) -> dict[str, str]:
    [row] = [
        r
        for r in rows
        if (r["kernel"], r["scenario"], r["provider"]) == (kernel, scenario, provider)
    ]
    return row


# ------------------------------------------------------------ from saved reports


def test_matrix_and_diffs_from_saved_reports() -> None:
    res = triage.compare(_runs(), "host")
    rows = triage.matrix_rows(res)
    assert [
        (r["kernel"], r["scenario"], r["provider"], r["verdict"], r["cause"]) for r in rows
    ] == [
        ("host", "seed-broken", "tracepoint", "broken", CAUSE),
        ("host", "seed-healthy", "tracepoint", "ok", "-"),
        ("6.1.0-56-amd64", "seed-broken", "fentry", "broken", CAUSE),
        ("6.1.0-56-amd64", "seed-healthy", "fentry", "ok", "-"),
        ("6.1.0-56-amd64", "seed-broken", "kprobe", "broken", CAUSE),
        ("6.1.0-56-amd64", "seed-healthy", "kprobe", "ok", "-"),
    ]
    status = {(r["kernel"], r["scenario"], r["provider"]): r["vs_baseline"] for r in rows}
    assert status[("host", "seed-broken", "tracepoint")] == "baseline"
    assert status[("6.1.0-56-amd64", "seed-broken", "fentry")] == "equivalent"
    assert status[("6.1.0-56-amd64", "seed-broken", "kprobe")] == "equivalent"
    # healthy: same verdict; the 6.18 host sends the DNATed SYN out of cni0, 6.1 does not
    assert status[("6.1.0-56-amd64", "seed-healthy", "fentry")] == "same verdicts"
    assert res.exit_status == 0

    text = triage.render(res)
    assert text.splitlines()[0].split() == [
        "kernel", "scenario", "provider", "verdict", "cause", "vs", "baseline", "(host)",
    ]  # fmt: skip
    assert (
        "== 6.1.0-56-amd64 seed-broken fentry vs baseline host seed-broken tracepoint: "
        "equivalent at shared stages (tracepoint vs fentry)"
    ) in text
    assert (
        "== 6.1.0-56-amd64 seed-healthy fentry vs baseline host seed-healthy tracepoint\n" in text
    )
    assert "compared at: shared stages (tracepoint vs fentry)" in text
    assert text.endswith("triage: every run has the baseline's verdicts\n")


def test_verdict_change_exits_3_and_shows_where() -> None:
    res = triage.compare(_runs(vm_broken="vm-6.1-fentry-healthy"), "host")
    assert res.exit_status == 3
    row = _row(triage.matrix_rows(res), "6.1.0-56-amd64", "seed-broken", "fentry")
    assert (row["verdict"], row["vs_baseline"]) == ("ok", "VERDICTS DIFFER")
    text = triage.render(res)
    assert "verdict broken -> ok" in text
    assert "SYN+ACK: A goes straight from node/veth-podb to node/veth-poda" in text
    assert text.endswith("triage: some runs' verdicts differ from the baseline's\n")


def test_failed_run_exits_1() -> None:
    runs = _runs()
    runs[2] = triage.Run("6.1.0-56-amd64", "seed-broken", "auto", None, "no report (exit 1): boom")
    res = triage.compare(runs, "host", ["VM with kernel 6.1.0-56 failed (vm-run exit 125): x"])
    assert res.exit_status == 1
    row = _row(triage.matrix_rows(res), "6.1.0-56-amd64", "seed-broken", "auto")
    assert (row["verdict"], row["vs_baseline"]) == ("error", "FAILED")
    text = triage.render(res)
    assert "seed-broken auto: FAILED: no report (exit 1): boom" in text
    assert "failure: VM with kernel 6.1.0-56 failed (vm-run exit 125): x" in text


def test_baseline_may_be_a_kernel_by_release_or_by_spec() -> None:
    for baseline in ("6.1.0-56-amd64", "6.1.0-56"):
        res = triage.compare(_runs(), baseline)
        rows = triage.matrix_rows(res)
        assert _row(rows, "6.1.0-56-amd64", "seed-broken", "fentry")["vs_baseline"] == "baseline"
        assert _row(rows, "host", "seed-broken", "tracepoint")["vs_baseline"] == "equivalent"
        assert res.exit_status == 0
    res = triage.compare(_runs(), "5.4.0")
    assert res.exit_status == 1
    assert "baseline 5.4.0 has no report for scenario seed-broken" in res.failures


def test_json_and_saved_files(tmp_path: Path) -> None:
    runs = _runs()
    triage.save(runs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "6.1.0-56-amd64-seed-broken-fentry.json",
        "6.1.0-56-amd64-seed-broken-kprobe.json",
        "6.1.0-56-amd64-seed-healthy-fentry.json",
        "6.1.0-56-amd64-seed-healthy-kprobe.json",
        "host-seed-broken-tracepoint.json",
        "host-seed-healthy-tracepoint.json",
    ]
    saved = json.loads((tmp_path / "host-seed-broken-tracepoint.json").read_text())
    assert saved == report("host-tracepoint-broken")
    doc = json.loads(json.dumps(triage.to_json(triage.compare(runs, "host"), tmp_path)))
    assert doc["schema"] == "hairtrace/triage@1" and doc["exit_status"] == 0
    vm = doc["runs"][2]
    assert (vm["kernel"], vm["provider"], vm["requested_provider"]) == (
        "6.1.0-56-amd64",
        "fentry",
        "auto",
    )
    assert vm["equivalent"] is True and vm["verdicts_match"] is True
    assert vm["diff"]["level"] == "shared stages (tracepoint vs fentry)"
    assert vm["file"] == str(tmp_path / "6.1.0-56-amd64-seed-broken-fentry.json")
    assert doc["runs"][0]["diff"] is None  # the baseline itself


# ------------------------------------------------- the VM side, without a VM


def _fake_vm(rc: int = 0, stderr: str = "") -> Any:
    """Stands for scripts/vm-run: runs the guest script here with sh."""
    calls: list[list[str]] = []

    def runner(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        assert cmd[0].endswith("scripts/vm-run") and cmd[cmd.index("--") + 1 : -1] == ["sh", "-c"]
        if rc:
            return subprocess.CompletedProcess(cmd, rc, "", stderr)
        kw.pop("check", None)
        return subprocess.run(["sh", "-c", cmd[-1]], check=False, **kw)

    runner.calls = calls  # type: ignore[attr-defined]
    return runner


def _cat(name: str) -> str:
    # a scenario command that ignores the hairtrace options triage appends
    return f"sh -c 'cat tests/fixtures/reports/{name}.json' scenario"


def test_one_boot_runs_every_scenario_and_provider() -> None:
    scenarios = [
        triage.Scenario("b", _cat("vm-6.1-kprobe-broken")),
        triage.Scenario("h", _cat("vm-6.1-kprobe-healthy")),
    ]
    runner = _fake_vm()
    runs, failure = triage.run_vm("6.1.0-56", scenarios, ["auto", "kprobe"], 60, runner=runner)
    assert failure is None
    [cmd] = runner.calls
    assert cmd[1:5] == ["--timeout", str(60 * 4 + triage.BOOT_SECONDS), "--kernel", "6.1.0-56"]
    assert "--provider kprobe" in cmd[-1]
    assert [(r.kernel, r.scenario, r.requested, r.provider, r.verdicts) for r in runs] == [
        ("6.1.0-56-amd64", "b", "auto", "kprobe", ["broken"]),
        ("6.1.0-56-amd64", "b", "kprobe", "kprobe", ["broken"]),
        ("6.1.0-56-amd64", "h", "auto", "kprobe", ["ok"]),
        ("6.1.0-56-amd64", "h", "kprobe", "kprobe", ["ok"]),
    ]


def test_a_run_without_report_is_an_error_not_a_crash() -> None:
    scenarios = [triage.Scenario("b", "echo oops >&2; exit 1")]
    runs, failure = triage.run_vm(None, scenarios, ["auto"], 60, runner=_fake_vm())
    assert failure is None  # the VM itself was fine
    [run] = runs
    assert run.kernel == "default-kernel" and run.report is None
    assert run.error == "no report (exit 1): oops"


def test_vm_that_does_not_boot_names_the_kernel() -> None:
    runner = _fake_vm(rc=125, stderr="vm-run: qemu: could not load kernel\n")
    runs, failure = triage.run_vm(
        "linux-image-6.1.0-47-amd64", [triage.Scenario("b", "true")], ["auto"], 60, runner=runner
    )
    assert runs == []
    assert failure == (
        "VM with kernel linux-image-6.1.0-47-amd64 failed (vm-run exit 125): "
        "vm-run: qemu: could not load kernel"
    )


def test_guest_output_is_split_at_markers() -> None:
    out = (
        "@@triage-run a auto\n{}\n@@triage-rc 3\n"
        "noise\n@@triage-run b fentry\npartial"
    )  # fmt: skip
    assert triage.split_vm_output(out) == [
        ("a", "auto", "{}\n", 3),
        ("b", "fentry", "partial", None),
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["--no-vm", "--kernel", "6.1.0-56"],
        ["--no-vm", "--no-host"],
        ["--no-host"],
        ["--providers", "fentry,bogus"],
        ["--scenario", "nope"],
        ["--timeout", "0"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("triage: ") and res.stderr.count("\n") == 1


# ---------------------------------------------------------------------- live


def _lab_env() -> dict[str, str]:
    # own namespace names, so this runs beside another engineer's seed lab
    return {
        **os.environ,
        "SEED_LAB_NODE": "tri-node",
        "SEED_LAB_POD_A": "tri-poda",
        "SEED_LAB_POD_B": "tri-podb",
    }


@pytest.mark.live
def test_host_only_run(tmp_path: Path) -> None:
    res = subprocess.run(
        [str(SCRIPT), "--no-vm", "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=600, env=_lab_env(), cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    rows = [(r["kernel"], r["scenario"], r["verdicts"][0], r["causes"]) for r in doc["runs"]]
    assert rows == [
        ("host", "seed-broken", "broken", [CAUSE]),
        ("host", "seed-healthy", "ok", []),
    ]
    # another seed lab on this host (same addresses, other netns names) can add an
    # `incomplete` connection of its own to a report: the tracer sees every netns
    assert all(set(r["verdicts"][1:]) <= {"incomplete"} for r in doc["runs"])
    assert all(r["vs_baseline"] == "baseline" for r in doc["runs"])
    providers = {r["provider"] for r in doc["runs"]}
    assert len(providers) == 1 and providers <= {"fentry", "kprobe", "tracepoint"}
    [prov] = providers
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"host-seed-broken-{prov}.json",
        f"host-seed-healthy-{prov}.json",
    ]


@pytest.mark.live
def test_vm_run_against_host(tmp_path: Path) -> None:
    """One VM boot (default Debian kernel, provider auto), seed-broken only: about 3 minutes."""
    needs_live()
    needs_binary("qemu-system-x86_64")
    res = subprocess.run(
        [str(SCRIPT), "--scenario", "seed-broken", "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=1200, env=_lab_env(), cwd=ROOT,
    )  # fmt: skip
    assert res.returncode in (0, 3), res.stderr[-3000:]
    doc = json.loads(res.stdout)
    host, vm = doc["runs"]
    assert res.returncode == doc["exit_status"]
    assert host["kernel"] == "host" and vm["kernel"] not in ("host", "default-kernel")
    assert vm["kernel_release"] == vm["kernel"]
    assert (vm["verdict"], vm["cause"]) == ("broken", CAUSE)
    if host["verdicts"] == ["broken"]:  # no other lab's connection crept into the host's
        assert vm["verdicts_match"] is True
        assert vm["vs_baseline"] == "equivalent", json.dumps(vm["diff"], indent=1)[-3000:]
    if host["provider"] != vm["provider"]:
        assert vm["diff"]["level"] == f"shared stages ({host['provider']} vs {vm['provider']})"
    assert (tmp_path / f"{vm['kernel']}-seed-broken-{vm['provider']}.json").is_file()
