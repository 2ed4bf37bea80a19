"""hairtrace as users run it, as a child process: start, wait until attached, stop, report."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracer.bench.procs import Procs, which
from tracer.errors import HairtraceError


def hairtrace_argv() -> list[str]:
    """The hairtrace command of this checkout (its venv's entry point when there is one)."""
    beside = Path(sys.executable).with_name("hairtrace")
    if beside.is_file():
        return [str(beside)]
    found = which("hairtrace")
    return [found] if found else [sys.executable, "-m", "tracer.cli"]


@dataclass
class Stopped:
    """What a stopped trace left: exit status, SIGTERM -> exit seconds, its JSON report."""

    status: int
    exit_seconds: float
    report: dict[str, Any]


class Tracer:
    """One `hairtrace --svc ... --no-live --json FILE --ready-file F` in the background."""

    def __init__(
        self,
        procs: Procs,
        workdir: Path,
        svc: str,
        netns: str,
        limit: float,
        wrap: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
    ) -> None:
        """wrap: a prefix that execs the rest (taskset, nice), so signals still reach hairtrace;
        extra: more hairtrace options."""
        self.procs = procs
        self.ready = workdir / "ready"
        self.json = workdir / "report.json"
        self.log = workdir / "hairtrace.log"
        for f in (self.ready, self.json):
            f.unlink(missing_ok=True)
        argv = [*wrap, *hairtrace_argv(), "--svc", svc, "--netns", netns, "--no-live",
                "--duration", f"{limit:g}", "--json", str(self.json),
                "--ready-file", str(self.ready), *extra]  # fmt: skip
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = procs.start(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_attached(self, timeout: float = 60) -> float:
        """Seconds from start to every probe attached (the ready file's content)."""
        end = time.monotonic() + timeout
        while not self.ready.exists() or not self.ready.read_text().strip():
            if self.proc.poll() is not None:
                raise HairtraceError(f"hairtrace exited ({self.proc.returncode}): {self._tail()}")
            if time.monotonic() > end:
                raise HairtraceError(f"hairtrace not attached after {timeout:.0f} s")
            time.sleep(0.01)
        return float(self.ready.read_text())

    def stop(self, timeout: float = 300) -> Stopped:
        """SIGTERM (the clean end: report, detach) and wait for the exit."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(self.proc, signal.SIGKILL)
            raise HairtraceError(f"hairtrace did not exit {timeout:.0f} s after SIGTERM") from None
        took = time.monotonic() - t0
        self.procs.stop(self.proc)  # forget it (and anything left in its group)
        self._log.close()
        if not self.json.exists():
            raise HairtraceError(f"hairtrace wrote no report (exit {self.proc.returncode}): "
                                 f"{self._tail()}")  # fmt: skip
        return Stopped(int(self.proc.returncode), took, json.loads(self.json.read_text()))

    def peak_rss_mib(self) -> float | None:
        """VmHWM of the running tracer (None once it has exited)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return None

    def _tail(self) -> str:
        self._log.flush()
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"
