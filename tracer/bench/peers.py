"""Peers on the same workload: bpftrace printing every event, tcpdump capturing the node.

Both watch the UDP flood that hairtrace's pktrate row filters out: bpftrace on
the tracepoints hairtrace uses (netif_receive_skb, net_dev_start_xmit,
kfree_skb), printing a line per event, as one would chase a packet with it;
tcpdump on every interface of hb-node. Rows: their pps overhead, and how much
of what they were offered they delivered (bpftrace's "Lost N events",
tcpdump's "packets dropped by kernel").

Each peer's rows stand alone: one that cannot run or fails is n/a with its own
error, and the other is still measured. bpftrace finds tracepoints through
tracefs; on a machine where it is not mounted (at /sys/kernel/tracing, or under
debugfs at /sys/kernel/debug/tracing) the bench mounts it read-only at
/sys/kernel/tracing for the bpftrace rows, unmounts it after however they end,
and says so in the rows' note.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from tracer.bench import netlab
from tracer.bench.compare import Comparison, compare
from tracer.bench.context import Env
from tracer.bench.procs import run, wait_for, which
from tracer.bench.rows import Row, not_available
from tracer.bench.traffic import Sample
from tracer.errors import HairtraceError

SECTION = "peers (UDP flood)"
NO_TRACER = "no tracer"
SCRIPT = """\
BEGIN { system("touch %(ready)s"); }
tracepoint:net:netif_receive_skb { printf("rx %%s %%u\\n", str(args->name), args->len); }
tracepoint:net:net_dev_start_xmit { printf("tx %%s %%u\\n", str(args->name), args->len); }
tracepoint:skb:kfree_skb { printf("drop %%d\\n", args->reason); }
"""
_LOST = re.compile(r"Lost (\d+) events")
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")
_TCPDUMP = re.compile(r"(\d+) packets? (captured|received by filter|dropped by kernel)")


def template() -> list[Row]:
    return [
        Row("peers.bpftrace_pps", SECTION, "UDP flood, bpftrace printing per event", "pps",
            baseline_name=NO_TRACER),
        Row("peers.bpftrace_printed", SECTION, "bpftrace events printed (of offered)", "ev/s",
            baseline_name="events offered (printed + lost)"),
        Row("peers.tcpdump_pps", SECTION, "UDP flood, tcpdump -i any in hb-node", "pps",
            baseline_name=NO_TRACER),
        Row("peers.tcpdump_captured", SECTION, "tcpdump packets captured (of offered)", "pkt/s",
            baseline_name="received by filter"),
    ]  # fmt: skip


class Bpftrace:
    def __init__(self, env: Env, n: int) -> None:
        self.env = env
        self.ready = env.workdir / f"bpftrace-{n}.ready"
        self.out = env.workdir / f"bpftrace-{n}.out"
        self.err = env.workdir / f"bpftrace-{n}.err"
        self.script = env.workdir / "peer.bt"
        self.script.write_text(SCRIPT % {"ready": self.ready})
        self._err: IO[bytes] | None = None
        self.proc: subprocess.Popen[Any] | None = None

    def start(self) -> None:
        self._err = open(self.err, "wb")  # noqa: SIM115 - closed in stop()
        cmd = ["bpftrace", "--unsafe", "-o", str(self.out), str(self.script)]
        self.proc = self.env.procs.start(cmd, stderr=self._err)
        proc = self.proc

        def attached() -> bool:
            if proc.poll() is not None:
                raise HairtraceError(f"bpftrace exited ({proc.returncode}): {self._last_error()}")
            return self.ready.exists()

        try:
            wait_for(attached, 60, "bpftrace to attach")
        except BaseException:
            self.env.procs.stop(proc)  # not left running into the next peer's rows
            self._err.close()
            raise

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None and self._err is not None
        self.proc.send_signal(signal.SIGINT)  # bpftrace's clean end: flush, report losses
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        self.env.procs.stop(self.proc)
        self._err.close()
        printed = lost = 0
        with open(self.out, errors="replace") as fh:
            for line in fh:
                if line.startswith(("rx ", "tx ", "drop ")):
                    printed += 1
                elif m := _LOST.search(line):
                    lost += int(m.group(1))
        lost += sum(int(m) for m in _LOST.findall(self.err.read_text(errors="replace")))
        return {"printed": printed, "lost": lost}

    def _last_error(self) -> str:
        lines = [ln for ln in self.err.read_text(errors="replace").splitlines()
                 if "RLIMIT_MEMLOCK" not in ln]  # fmt: skip
        return lines[-1] if lines else "no output"


class Tcpdump:
    def __init__(self, env: Env, n: int) -> None:
        self.env = env
        self.err = env.workdir / f"tcpdump-{n}.err"
        self._err: IO[bytes] | None = None
        self.proc: subprocess.Popen[Any] | None = None

    def start(self) -> None:
        self._err = open(self.err, "wb")  # noqa: SIM115 - closed in stop()
        cmd = ["tcpdump", "-i", "any", "-n", "-w", "/dev/null"]
        self.proc = self.env.procs.start(netlab.exec_in(netlab.NODE, cmd), stderr=self._err)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise HairtraceError(f"tcpdump exited ({proc.returncode}): {self._text()[-200:]}")
            return "listening on" in self._text()

        try:
            wait_for(listening, 30, "tcpdump to start capturing")
        except BaseException:
            self.env.procs.stop(proc)
            self._err.close()
            raise

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None and self._err is not None
        self.proc.send_signal(signal.SIGINT)  # tcpdump prints its counters on SIGINT
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self.env.procs.stop(self.proc)
        self._err.close()
        counts = {kind: int(n) for n, kind in _TCPDUMP.findall(self._text())}
        return {
            "captured": counts.get("captured"),
            "received_by_filter": counts.get("received by filter"),
            "dropped_by_kernel": counts.get("dropped by kernel"),
        }

    def _text(self) -> str:
        return self.err.read_text(errors="replace")


def _missing(tool: str) -> str | None:
    if which(tool) is None:
        return f"{tool} not installed (scripts/setup installs it)"
    return None


def measure(env: Env) -> list[Row]:
    """bpftrace's rows, then tcpdump's: each pair measured, or n/a with its own reason."""
    bt_pps, bt_printed, td_pps, td_captured = template()

    def traffic() -> Sample:
        return env.traffic.udp(env.seconds)

    rows: list[Row] = []
    with tracefs_for_bpftrace() as mounted:
        n = iter(range(100))
        bt = _peer_rows(
            (bt_pps, bt_printed),
            lambda: _missing("bpftrace") or _bpftrace_works(),
            lambda: compare(traffic, lambda: Bpftrace(env, next(n)), env.rounds),
            "printed",
            "lost",
        )
        rows += [replace(r, note=mounted) if mounted else r for r in bt]
    n = iter(range(100))
    rows += _peer_rows(
        (td_pps, td_captured),
        lambda: _missing("tcpdump"),
        lambda: compare(traffic, lambda: Tcpdump(env, next(n)), env.rounds),
        "captured",
        None,
    )
    return rows


def _peer_rows(
    templates: tuple[Row, Row],
    why_not: Callable[[], str | None],
    measure_peer: Callable[[], Comparison],
    got: str,
    lost: str | None,
) -> list[Row]:
    """One peer's (pps, delivered) rows; n/a with this peer's own error when it fails."""
    pps_row, delivered_row = templates
    why = why_not()
    if why is None:
        try:
            cmp = measure_peer()
        except Exception as exc:  # noqa: BLE001 - this peer's rows are n/a, the other's go on
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        else:
            return [cmp.row(pps_row), _delivered(delivered_row, cmp, got, lost)]
    return [not_available(pps_row, why), not_available(delivered_row, why)]


def tracefs_mounted() -> bool:
    """Whether bpftrace finds the tracepoints' event directories (tracefs or debugfs)."""
    return any((p / "events").is_dir() for p in (TRACEFS, DEBUGFS_TRACING))


def mount_tracefs() -> None:
    # read-only: bpftrace only reads the events' ids and formats
    run(["mount", "-t", "tracefs", "-o", "ro", "nodev", str(TRACEFS)])


def umount_tracefs() -> None:
    try:
        run(["umount", str(TRACEFS)])
    except HairtraceError:
        run(["umount", "-l", str(TRACEFS)])  # still in use: detached now, freed when unused


@contextmanager
def tracefs_for_bpftrace() -> Iterator[str | None]:
    """tracefs there for the block: mounted by the bench (and unmounted after, however the
    block ends) only when it is not already; the note to show, or None."""
    if tracefs_mounted():
        yield None
        return
    try:
        mount_tracefs()
    except HairtraceError as exc:
        yield f"tracefs was not mounted and the bench could not mount it: {exc}"
        return
    try:
        yield (f"tracefs was not mounted: the bench mounted it read-only at {TRACEFS} "
               "for bpftrace and unmounted it after")  # fmt: skip
    finally:
        umount_tracefs()


def _delivered(row: Row, cmp: Comparison, got: str, lost: str | None) -> Row:
    """What the peer delivered per second of traffic, against what it was offered."""
    counts: list[tuple[int, int]] = []  # (delivered, offered) in each round
    for o in cmp.observed:
        delivered = o.get(got) or 0
        if lost is not None:
            offered = delivered + (o.get(lost) or 0)
        else:
            offered = o.get("received_by_filter") or 0
        counts.append((delivered, offered))
    secs = sum(s.seconds for s in cmp.with_)
    rates = [(d / s.seconds, o / s.seconds) for (d, o), s in zip(counts, cmp.with_, strict=False)]
    return replace(row, value=round(sum(d for d, _ in counts) / secs),
                   baseline=round(sum(o for _, o in counts) / secs),
                   rounds=tuple(round(d) for d, _ in rates),
                   round_ratios=tuple(d / o for d, o in counts if o),
                   detail={"observer": cmp.observed, "seconds": round(secs, 3)})  # fmt: skip


def _bpftrace_works() -> str | None:
    """Why bpftrace cannot run here (it needs perf-event tracepoints), or None."""
    try:
        run(["bpftrace", "-e", "BEGIN { exit(); }"], timeout=60)
    except HairtraceError as exc:
        return f"bpftrace cannot run here: {exc}"
    return None
