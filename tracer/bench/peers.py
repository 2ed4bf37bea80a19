"""Peers on the same workload: bpftrace printing every event, tcpdump capturing the node.

Both watch the UDP flood that hairtrace's pktrate row filters out: bpftrace on
the tracepoints hairtrace uses (netif_receive_skb, net_dev_start_xmit,
kfree_skb), printing a line per event, as one would chase a packet with it;
tcpdump on every interface of hb-node. Rows: their pps overhead, and how much
of what they were offered they delivered (bpftrace's "Lost N events",
tcpdump's "packets dropped by kernel").
"""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import replace
from typing import IO, Any

from tracer.bench import netlab
from tracer.bench.compare import Comparison, compare
from tracer.bench.context import Env
from tracer.bench.procs import run, wait_for, which
from tracer.bench.rows import Row, not_available
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

        wait_for(attached, 60, "bpftrace to attach")

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

        wait_for(listening, 30, "tcpdump to start capturing")

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
    bt_pps, bt_printed, td_pps, td_captured = template()
    secs = env.seconds
    rows: list[Row] = []
    why = _missing("bpftrace") or _bpftrace_works()
    if why:
        rows += [not_available(bt_pps, why), not_available(bt_printed, why)]
    else:
        n = iter(range(100))
        bt = compare(lambda: env.traffic.udp(secs), lambda: Bpftrace(env, next(n)), env.rounds)
        rows += [bt.row(bt_pps), _delivered(bt_printed, bt, "printed", "lost")]
    why = _missing("tcpdump")
    if why:
        rows += [not_available(td_pps, why), not_available(td_captured, why)]
    else:
        n = iter(range(100))
        td = compare(lambda: env.traffic.udp(secs), lambda: Tcpdump(env, next(n)), env.rounds)
        rows += [td.row(td_pps), _delivered(td_captured, td, "captured", None)]
    return rows


def _delivered(row: Row, cmp: Comparison, got: str, lost: str | None) -> Row:
    """What the peer delivered per second of traffic, against what it was offered."""
    secs = sum(s.seconds for s in cmp.with_)
    delivered = sum(o.get(got) or 0 for o in cmp.observed)
    if lost is not None:
        offered = delivered + sum(o.get(lost) or 0 for o in cmp.observed)
    else:
        offered = sum(o.get("received_by_filter") or 0 for o in cmp.observed)
    return replace(row, value=round(delivered / secs), baseline=round(offered / secs),
                   detail={"observer": cmp.observed, "seconds": round(secs, 3)})  # fmt: skip


def _bpftrace_works() -> str | None:
    """Why bpftrace cannot run here (it needs perf-event tracepoints), or None."""
    try:
        run(["bpftrace", "-e", "BEGIN { exit(); }"], timeout=60)
    except HairtraceError as exc:
        return f"bpftrace cannot run here: {exc}"
    return None
