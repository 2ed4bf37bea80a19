"""Bad input gets one specific line on stderr and the documented exit status, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import AS_NOBODY, needs_root, nobody_can_run

HAIRTRACE = [sys.executable, "-m", "tracer.cli"]


def run(
    *args: str,
    env: dict[str, str] | None = None,
    as_nobody: bool = False,
) -> subprocess.CompletedProcess[str]:
    cmd = HAIRTRACE + list(args)
    if as_nobody:
        cmd = [*AS_NOBODY, *cmd]
    return subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=os.path.dirname(__file__) + "/..",
    )


def assert_one_line_error(res: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("hairtrace: error: ") and needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "svc,needle",
    [
        ("my-service", "expected an IPv4 address"),
        ("fd00::10", "only IPv4"),
        ("100.67.30.133:0", "1-65535"),
        ("100.67.30.133:99999", "1-65535"),
    ],
)
def test_bad_service_is_usage_error(svc: str, needle: str) -> None:
    assert_one_line_error(run("--svc", svc, "--duration", "1"), 2, needle)


def test_no_service_prints_usage_and_exits_2() -> None:
    res = run()
    assert res.returncode == 2 and "--svc" in res.stderr


def test_unknown_netns_is_usage_error() -> None:
    assert_one_line_error(
        run("--svc", "10.0.0.1", "--netns", "no-such-ns-xyz", "--duration", "1"),
        2,
        "unknown network namespace 'no-such-ns-xyz'",
    )


def test_path_that_is_not_a_netns_is_usage_error() -> None:
    assert_one_line_error(
        run("--svc", "10.0.0.1", "--netns", "/etc/hostname", "--duration", "1"), 2, "/etc/hostname"
    )


def test_command_not_found_is_usage_error() -> None:
    assert_one_line_error(
        run("--svc", "10.0.0.1", "--", "no-such-command-xyz", "arg"),
        2,
        "command not found: no-such-command-xyz",
    )


def test_negative_duration_is_usage_error() -> None:
    assert_one_line_error(run("--svc", "10.0.0.1", "--duration", "-1"), 2, "--duration")


def test_missing_btf_is_a_specific_error() -> None:
    needs_root()
    res = run(
        "--svc", "10.0.0.1", "--duration", "1", env={"HAIRTRACE_KERNEL_BTF": "/nonexistent/vmlinux"}
    )
    assert_one_line_error(res, 1, "no kernel BTF at /nonexistent/vmlinux")


@pytest.mark.optional
def test_not_root_is_a_specific_error() -> None:
    needs_root()  # to drop privileges we must have them
    if not nobody_can_run("import tracer.cli"):
        pytest.skip("this checkout is not readable by uid 65534; the capability test covers it")
    res = run("--svc", "10.0.0.1", "--duration", "1", as_nobody=True)
    assert_one_line_error(res, 1, "not root")


def test_root_without_capabilities_is_a_specific_error() -> None:
    needs_root()
    cmd = [
        "setpriv",
        "--bounding-set=-all",
        "--inh-caps=-all",
        *HAIRTRACE,
        "--svc",
        "10.0.0.1",
        "--duration",
        "1",
    ]
    res = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(__file__) + "/..",
    )
    assert_one_line_error(res, 1, "without the needed capabilities")


def test_lab_needs_root() -> None:
    needs_root()
    res = run("lab", "status", as_nobody=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "root" in res.stderr


REPORTS = os.path.join(os.path.dirname(__file__), "fixtures", "reports")


def test_diff_broken_vs_healthy_names_the_syn_ack_divergence() -> None:
    res = run(
        "diff", f"{REPORTS}/host-tracepoint-broken.json", f"{REPORTS}/host-tracepoint-healthy.json"
    )
    assert res.returncode == 3, res.stderr
    assert "verdict broken -> ok" in res.stdout
    assert "SYN+ACK: A goes straight from node/veth-podb to node/veth-poda" in res.stdout


def test_diff_host_vs_vm_is_equivalent_at_shared_stages() -> None:
    res = run(
        "diff",
        "--json",
        f"{REPORTS}/host-tracepoint-broken.json",
        f"{REPORTS}/vm-6.1-fentry-broken.json",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    import json

    d = json.loads(res.stdout)
    assert d["equivalent"] is True
    assert "tracepoint vs fentry" in d["level"]


def test_diff_bad_input_is_a_usage_error(tmp_path: object) -> None:
    import pathlib

    bad = pathlib.Path(str(tmp_path)) / "bad.json"
    bad.write_text("{not json")
    res = run("diff", str(bad), f"{REPORTS}/host-tracepoint-broken.json")
    assert_one_line_error(res, 2, "bad.json")


def test_replay_of_a_non_session_is_a_clear_error(tmp_path: object) -> None:
    import pathlib

    bad = pathlib.Path(str(tmp_path)) / "x.hts"
    bad.write_bytes(b"hello, not a session")
    assert_one_line_error(run("replay", str(bad)), 1, "not a hairtrace session file")


def test_lab_fault_knobs_list_and_refuse_unknown_names() -> None:
    from tracer.lab.faults import FAULTS

    res = run("lab", "up", "--list-faults")
    assert res.returncode == 0, res.stderr
    for f in FAULTS.values():
        assert any(ln.split()[:2] == [f.name, f.cause or "ok"] for ln in res.stdout.splitlines())
    assert_one_line_error(run("lab", "up", "--fault", "nope"), 2, "unknown fault 'nope'")


def test_lab_fault_the_host_kernel_cannot_reproduce_is_refused_before_building() -> None:
    needs_root()
    res = run("lab", "up", "--fault", "no-br-netfilter")
    assert_one_line_error(res, 1, "br_netfilter is not loaded")
    assert "scripts/vm-run" in res.stderr
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert "ht-n1" not in listed.stdout
