"""Small helpers for the lab: run commands, manage named network namespaces, read sysctls.

Everything here goes through the ``ip`` tool (``ip netns add/del/exec``) so the
namespaces are the ordinary named ones under ``/run/netns`` that any operator can
inspect by hand. Failures raise :class:`~tracer.errors.HairtraceError` carrying the
failing command and the first line of its stderr.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tracer.errors import HairtraceError

NETNS_DIR = Path("/run/netns")
DEFAULT_TIMEOUT = 20.0


def _first_line(text: str) -> str:
    """The first non-empty line of a command's output, for one-line error messages."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def run(
    argv: Sequence[str],
    *,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise HairtraceError if it fails and check is set."""
    command = shlex.join(argv)
    try:
        proc = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            env=None if env is None else dict(env),
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise HairtraceError(f"{argv[0]}: command not found (needed for: {command})") from exc
    except subprocess.TimeoutExpired as exc:
        raise HairtraceError(f"timed out after {timeout:g} s: {command}") from exc
    if check and proc.returncode != 0:
        reason = _first_line(proc.stderr) or _first_line(proc.stdout) or "no output"
        raise HairtraceError(f"{command} failed (exit {proc.returncode}): {reason}")
    return proc


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside netns ``ns`` (``ip netns exec NS ...``)."""
    return ["ip", "netns", "exec", ns, *argv]


def run_in(
    ns: str,
    argv: Sequence[str],
    *,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command inside network namespace ``ns``; raise HairtraceError on failure."""
    return run(exec_argv(ns, argv), input_text=input_text, env=env, timeout=timeout, check=check)


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``), in ip's order."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def exists(ns: str) -> bool:
    """Whether a named network namespace ``ns`` exists."""
    return (NETNS_DIR / ns).exists()


def add(ns: str) -> None:
    """Create the named network namespace ``ns`` and bring its loopback up."""
    run(["ip", "netns", "add", ns])
    run_in(ns, ["ip", "link", "set", "lo", "up"])


def delete(ns: str) -> bool:
    """Delete netns ``ns`` if it exists; return whether there was one to delete."""
    if not exists(ns):
        return False
    run(["ip", "netns", "delete", ns])
    return True


def pids(ns: str) -> list[int]:
    """Pids of the processes running inside netns ``ns`` (``ip netns pids``)."""
    if not exists(ns):
        return []
    out = run(["ip", "netns", "pids", ns]).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def sysctl_path(key: str) -> str:
    """The /proc/sys path of a dotted sysctl key (net.ipv4.ip_forward -> /proc/sys/net/ipv4/...)."""
    if not key or "/" in key or ".." in key:
        raise HairtraceError(f"not a sysctl key: {key!r}")
    return "/proc/sys/" + key.replace(".", "/")


def sysctl_exists(ns: str, key: str) -> bool:
    """Whether sysctl ``key`` exists as seen from inside netns ``ns``."""
    return run_in(ns, ["test", "-e", sysctl_path(key)], check=False).returncode == 0


def sysctl_read(ns: str, key: str) -> str:
    """The value of sysctl ``key`` inside netns ``ns`` (stripped text)."""
    proc = run_in(ns, ["cat", sysctl_path(key)], check=False)
    if proc.returncode != 0:
        raise HairtraceError(
            f"cannot read sysctl {key} in netns {ns}: {_first_line(proc.stderr) or 'no output'}"
        )
    return proc.stdout.strip()


def sysctl_write(ns: str, key: str, value: str | int) -> None:
    """Set sysctl ``key`` to ``value`` inside netns ``ns`` only (never the caller's netns)."""
    run_in(ns, ["sysctl", "-q", "-w", f"{key}={value}"])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process; reaps it if it is our exited child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Format: "pid (comm) S ...": the state follows the last ')'.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def pid_cmdline(pid: int) -> list[str]:
    """The argv of process ``pid`` ([] if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
