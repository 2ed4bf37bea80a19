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
        ("100.67.30.133:53/sctp", "bad service protocol 'sctp': expected tcp or udp"),
        ("100.67.30.133/icmp", "bad service protocol"),
        ("10.96.0.1/12", "host bits set (did you mean 10.96.0.0/12?)"),
        ("10.96.0.0:53/12", "a range takes no port"),
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


# --- click's own usage errors: one line, exit 2, for every command (issue 17, 8c) ---

SESSION = os.path.join(os.path.dirname(__file__), "fixtures", "faults", "bridge-nf-off.hts")


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--provider", "foo"), "Invalid value for '--provider'"),
        (("--data-packets", "999"), "Invalid value for '--data-packets'"),
        (("replay",), "Missing argument 'FILE'"),
        (("lab", "up", "--bridge-nf-call-iptables", "7"), "'--bridge-nf-call-iptables'"),
        (("export", SESSION, "--format", "xml"), "Invalid value for '--format'"),
        (("diff", "a.json"), "Missing argument 'B'"),
        (("no-such-command",), "No such command 'no-such-command'"),
        (("lab", "no-such-command"), "No such command 'no-such-command'"),
        (("--btf", "/nonexistent/btf"), "'--btf'"),
    ],
)
def test_click_usage_errors_are_one_line(args: tuple[str, ...], needle: str) -> None:
    res = run(*args)
    assert_one_line_error(res, 2, needle)
    assert res.stdout == ""


def _command_paths(group: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import click

    paths = [prefix]
    if isinstance(group, click.Group):
        for name, cmd in group.commands.items():
            paths += _command_paths(cmd, (*prefix, name))
    return paths


def test_every_command_reports_an_unknown_option_in_one_line() -> None:
    from tracer.cli import main

    paths = _command_paths(main)
    assert ("lab", "up") in paths and ("replay",) in paths  # the walk found the tree
    for path in paths:
        res = run(*path, "--no-such-option-xyz")
        assert_one_line_error(res, 2, "--no-such-option-xyz")


@pytest.mark.parametrize("path", [(), ("lab", "up"), ("replay",)])
def test_help_is_still_clicks_full_help(path: tuple[str, ...]) -> None:
    res = run(*path, "--help")
    assert res.returncode == 0 and res.stderr == ""
    usage = res.stdout.splitlines()[0]
    assert usage.startswith("Usage: ") and " ".join(("", *path, "[OPTIONS]")) in usage, usage
    assert "\nOptions:\n" in res.stdout and "-h, --help" in res.stdout


def test_json_help_says_where_cmd_output_goes() -> None:
    res = run("--help")
    assert "the output of -- CMD goes to stderr" in " ".join(res.stdout.split())


# --- output paths checked before any work (issue 17, items 3 and 8d) ---


def _fast_one_line(res: subprocess.CompletedProcess[str], took: float, needle: str) -> None:
    assert_one_line_error(res, 2, needle)
    assert res.stdout == ""
    assert took < 15, took  # a trace started would run its --duration 30 first


def _timed(*args: str, **kw: object) -> tuple[subprocess.CompletedProcess[str], float]:
    import time

    t0 = time.monotonic()
    res = run(*args, **kw)  # type: ignore[arg-type]
    return res, time.monotonic() - t0


@pytest.mark.parametrize("option", ["--json", "--record"])
@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda d: str(d), "is a directory"),
        (lambda d: f"{d}/new-dir/", "is a directory"),
        (lambda d: f"{d}/missing/r.out", "missing does not exist"),
        (lambda d: f"{d}/a-file/r.out", "a-file is not a directory"),
    ],
)
def test_bad_output_path_of_a_trace_exits_2_before_attaching(
    tmp_path: object, option: str, make: object, needle: str
) -> None:
    import pathlib

    d = pathlib.Path(str(tmp_path))
    (d / "a-file").write_text("")
    dest = make(d)  # type: ignore[operator]
    ready = d / "ready"
    res, took = _timed(
        "--svc", "100.67.30.133", "--duration", "30", "--ready-file", str(ready), option, dest
    )
    _fast_one_line(res, took, f"{option} {dest}: ")
    assert needle in res.stderr
    assert not ready.exists()  # never attached


def test_bad_json_path_is_a_usage_error_for_a_non_root_user() -> None:
    needs_root()  # to drop privileges we must have them
    if not nobody_can_run("import tracer.cli"):
        pytest.skip("this checkout is not readable by uid 65534")
    res = run("--svc", "100.67.30.133", "--json", "/nonexistent/x.json", as_nobody=True)
    assert_one_line_error(res, 2, "--json /nonexistent/x.json: directory /nonexistent does not")
    res = run("--svc", "100.67.30.133", "--json", "/etc/ht-x.json", as_nobody=True)
    assert_one_line_error(res, 2, "--json /etc/ht-x.json: directory /etc is not writable")


def test_record_onto_an_existing_file_is_a_usage_error(tmp_path: object) -> None:
    import pathlib

    d = pathlib.Path(str(tmp_path))
    session = d / "s.hts"
    session.write_text("precious")
    res, took = _timed(
        "--svc", "100.67.30.133", "--duration", "30", "--ready-file", str(d / "ready"),
        "--record", str(session),
    )  # fmt: skip
    _fast_one_line(res, took, f"session file {session} exists (use --force to overwrite)")
    assert session.read_text() == "precious" and not (d / "ready").exists()


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_replay_checks_its_json_path_before_replaying(tmp_path: object, stream: str) -> None:
    res = run("replay", SESSION, stream, "--json", f"{tmp_path}/missing/r.json")
    assert_one_line_error(res, 2, f"--json {tmp_path}/missing/r.json: directory")
    assert res.stdout == ""  # one line only: no summary of a replay that was not done


@pytest.mark.parametrize("force", [(), ("--force",)])
def test_export_checks_its_out_path_before_exporting(tmp_path: object, force: tuple) -> None:
    import pathlib

    res = run("export", SESSION, "--format", "csv", "--out", f"{tmp_path}/missing/e.csv", *force)
    assert_one_line_error(res, 2, f"--out {tmp_path}/missing/e.csv: directory")
    res = run("export", SESSION, "--format", "csv", "--out", str(tmp_path), *force)
    assert_one_line_error(res, 2, f"--out {tmp_path}: is a directory")
    assert pathlib.Path(str(tmp_path)).is_dir() and not list(pathlib.Path(str(tmp_path)).iterdir())


def test_check_writable_accepts_what_can_be_written(tmp_path: object) -> None:
    import pathlib

    from tracer.cli_output import check_writable
    from tracer.errors import UsageError

    d = pathlib.Path(str(tmp_path))
    (d / "old.json").write_text("{}")
    for ok in ("-", str(d / "new.json"), str(d / "old.json")):
        check_writable(ok, "--json")
    with pytest.raises(UsageError, match="^--json .*: is a directory, not a file$"):
        check_writable(str(d), "--json")


# --- `--json -` keeps stdout for the report: CMD's stdout goes to stderr (issue 17, item 2) ---


@pytest.mark.parametrize("to_stderr", [True, False])
def test_command_stdout_goes_to_stderr_when_asked(to_stderr: bool) -> None:
    code = (
        "from tracer.trace import _start_command\n"
        f"_start_command(('sh', '-c', 'echo from-cmd'), {to_stderr}).wait()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(__file__) + "/..",
    )
    assert ("from-cmd" in res.stderr) is to_stderr
    assert ("from-cmd" in res.stdout) is not to_stderr


def test_a_group_without_its_command_still_shows_its_help() -> None:
    res = run("lab")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("Usage: ") and "\nCommands:\n" in res.stderr
    assert "error" not in res.stderr
