"""Child processes of the bench: started tracked, always ended (by their own id).

Every process the bench starts goes through Procs, in its own process group,
so that leaving a `with Procs()` block, normally or by an exception or Ctrl-C,
ends exactly those processes and nothing else. Also: CPU pinning and the small
C helpers compiled with clang at bench time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from tracer.errors import HairtraceError

HERE = Path(__file__).resolve().parent
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def which(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath)
    return shutil.which(name, path=os.pathsep.join([path, *SBIN]))


def run(cmd: list[str], *, timeout: float = 60, check: bool = True) -> str:
    """Run to completion; stdout. A failure is a HairtraceError with stderr's last line."""
    try:
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise HairtraceError(f"{cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise HairtraceError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s") from None
    if check and res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        raise HairtraceError(f"{' '.join(cmd)}: {last}")
    return res.stdout


def pinned(cpu: int | None, cmd: list[str]) -> list[str]:
    """cmd run on one CPU (taskset), or as is when cpu is None or taskset is missing."""
    if cpu is None or which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(cpu), *cmd]


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class Procs:
    """Starts processes and ends the ones still running when the block is left."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(
        self,
        cmd: list[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        text: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[Any]:
        try:
            proc = subprocess.Popen(
                cmd, stdin=stdin, stdout=stdout, stderr=stderr, text=text,
                start_new_session=True, env=env,
            )  # fmt: skip
        except FileNotFoundError:
            raise HairtraceError(f"{cmd[0]} not found") from None
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait: float = 5) -> int:
        """Signal proc's process group, wait, then SIGKILL it; the exit status.

        Only while the leader is not yet reaped: its pid, and so the group id,
        cannot have been reused by then.
        """
        if proc.poll() is None:
            _signal_group(proc.pid, sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)
        return int(proc.returncode)

    def stop_all(self) -> None:
        while self._procs:
            self.stop(self._procs[-1], wait=2)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(cond: Any, timeout: float, what: str, step: float = 0.02) -> None:
    """Poll cond() until true; HairtraceError naming `what` after timeout seconds."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise HairtraceError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


class Tools:
    """The bench's C helpers (tracer/bench/*.c), compiled once into a temporary directory."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="hairtrace-bench-")
        self.dir = Path(self._dir.name)
        self._built: dict[str, Path] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._dir.cleanup()

    def get(self, name: str) -> Path:
        if name not in self._built:
            cc = which("clang") or which("cc")
            if cc is None:
                raise HairtraceError("no C compiler (clang) to build the bench helpers")
            out = self.dir / name
            run([cc, "-O2", "-Wall", "-o", str(out), str(HERE / f"{name}.c")], timeout=120)
            self._built[name] = out
        return self._built[name]
