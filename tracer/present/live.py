"""The rich live view and the end-of-trace summary (on stderr; stdout stays for JSON)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.model import service_label
from tracer.analysis.reassemble import Connection
from tracer.present.digest import Digest
from tracer.present.report import RunInfo
from tracer.trace import Stats, TraceOptions, TraceResult, run_trace

_STYLE = {"ok": "green", "broken": "bold red", "recovered": "yellow", "incomplete": "magenta"}


def _console() -> Console:
    # Logs and pipes get a readable width instead of rich's 80-column fallback.
    probe = Console(stderr=True)
    return Console(stderr=True, highlight=False, width=None if probe.is_terminal else 140)


def _header(run: RunInfo) -> Text:
    return Text.from_markup(
        f"[bold]hairtrace[/] {run.tool_version}  service "
        f"{service_label(run.service_ip, run.service_port)}  netns "
        f"{run.netns}  kernel {run.kernel}\nbackend {run.backend_reason or run.backend}\n"
        f"provider {run.provider_reason}; "
        f"attached {len(run.attached)} programs in {run.trace_attach_seconds or 0:.3f}s "
        f"({run.attach_seconds or 0:.3f}s after process start)"
        + "".join(f"\n  skipped {k}: {v}" for k, v in run.skipped.items())
        + "".join(f"\n[bold yellow]warning:[/] {escape(w)}" for w in run.warnings)
    )


def _announce(console: Console) -> Callable[[RunInfo], None]:
    """Without a live view, what must be said at start: the warnings, at once."""

    def announce(run: RunInfo) -> None:
        for w in run.warnings:
            console.print(f"[bold yellow]warning:[/] {escape(w)}")

    return announce


MAX_ROWS = 25  # beyond this, ok rows are tallied instead of listed


def _table(results: list[tuple[Connection, Diagnosis]]) -> Table:
    return _digest_table(Digest.of(results, MAX_ROWS))


def _digest_table(digest: Digest) -> Table:
    table = Table(expand=True, show_lines=False)
    for col in ("client", "service", "backend", "packets", "verdict", "where / cause"):
        table.add_column(col)
    shown, hidden = digest.shown()
    if hidden:
        table.caption = f"... and {hidden} more ok connection(s) not listed ({digest.tally()})"
    for conn, diag in shown:
        backend = f"{conn.backend[0]}:{conn.backend[1]}" if conn.backend else "-"
        roles = compact_roles([p.role for p in conn.packets])
        where = ""
        if diag.brk:
            b = diag.brk
            where = f"{b.where}: {b.cause}"
        table.add_row(
            f"{conn.key.src}:{conn.key.sport}",
            f"{conn.key.dst}:{conn.key.dport}",
            backend,
            roles,
            Text(diag.verdict, style=_STYLE.get(diag.verdict, "")),
            where,
        )
    return table


def compact_roles(roles: list[str]) -> str:
    """'SYN SYN+ACK RST SYN SYN+ACK RST' -> 'SYN SYN+ACK RST x2' (retries stay readable)."""
    out: list[str] = []
    i = 0
    while i < len(roles):
        for size in range(min(4, (len(roles) - i) // 2), 0, -1):
            unit = roles[i : i + size]
            n = 1
            while roles[i + n * size : i + (n + 1) * size] == unit:
                n += 1
            if n > 1:
                out.append(" ".join(unit) + f" x{n}")
                i += n * size
                break
        else:
            out.append(roles[i])
            i += 1
    return " ".join(out)


def _losses(stats: Stats) -> Text:
    if not stats.lost:
        return Text(f"{stats.events} events, 0 lost")
    per = ", ".join(f"{k} {v}" for k, v in stats.lost_by_point.items())
    return Text(
        f"{stats.events} events, {stats.lost} LOST ({per}): affected connections are incomplete",
        style="bold red",
    )


def _run_losses(run: RunInfo) -> Text:
    """The summary's loss line; unknown losses (a recording without footer) are not 0."""
    if run.lost_events is None:
        why = run.lost_events_unknown or "not recorded"
        return Text(f"{run.events} events, events lost: unknown ({why})", style="bold yellow")
    return _losses(Stats(run.events, run.lost_events, run.lost_by_point or {}))


class LiveSink:
    """Redraws the connection table as events arrive; breaks show the moment they are known."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Live | None = None
        self.header = Text("")

    def attached(self, run: RunInfo) -> None:
        self.header = _header(run)
        self.live = Live(
            Group(self.header, Text("waiting for packets...")),
            console=self.console,
            refresh_per_second=4,
            transient=True,
        )
        self.live.start()

    def update(self, results: list[tuple[Connection, Diagnosis]], stats: Stats) -> None:
        if self.live is not None:
            self.live.update(Group(self.header, _table(results), _losses(stats)))

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def trace_with_view(opts: TraceOptions, live: bool) -> TraceResult:
    """Trace with the live table (when live), then print the summary either way."""
    console = _console()
    sink = LiveSink(console) if live else None
    try:
        result = run_trace(opts, sink, announce=None if sink else _announce(console))
    finally:
        if sink:
            sink.close()
    render_summary(result, console)
    return result


class Outcome(Protocol):
    """A live trace's result or a replayed session's: what the summary needs."""

    @property
    def run(self) -> RunInfo: ...

    @property
    def results(self) -> list[tuple[Connection, Diagnosis]]: ...


def render_summary(result: Outcome, console: Console | None = None) -> None:
    """Everything a person needs at the end: table, then each break in full."""
    render_digest(result.run, Digest.of(result.results, MAX_ROWS), console)


def render_digest(run: RunInfo, digest: Digest, console: Console | None = None) -> None:
    """render_summary of the connections gathered in digest (a streamed replay)."""
    console = console or _console()
    console.print(_header(run))
    console.print(_digest_table(digest))
    console.print(_run_losses(run))
    if not digest.total:
        console.print("no connection to the service was seen")
    else:
        console.print(digest.tally())
    same: dict[tuple[str, str, str], int] = {}
    for conn, diag in digest.results:  # every one with notes or a break is kept
        for note in diag.notes:
            console.print(f"[magenta]note[/] {conn.key}: {note}")
        if diag.brk is None:
            continue
        b = diag.brk
        kind = (diag.verdict, b.cause, b.where)
        same[kind] = same.get(kind, 0) + 1
        if same[kind] > 1:
            continue  # the same break again: counted below, not repeated
        body = Text()
        body.append(f"{b.explanation}\n\n", style="bold")
        body.append("where: ", style="bold")
        crossed = b.via and not b.bridged  # a bridged break names its ports already
        via = f"; devices crossed in {b.netns}: {' -> '.join(b.via)}" if crossed else ""
        body.append(f"{b.where}{via}\n")
        body.append("evidence:\n", style="bold")
        for item in b.evidence:
            body.append(f"  - {item}\n")
        body.append("fix: ", style="bold green")
        body.append(b.fix)
        console.print(
            Panel(
                body,
                title=f"{diag.verdict}: {b.cause}  ({conn.key})",
                border_style=_STYLE.get(diag.verdict, ""),
            )
        )
    for (verdict, cause, where), n in same.items():
        if n > 1:
            console.print(
                f"{n - 1} more connection(s) {verdict} the same way: {cause}, {where}; "
                "each is in the JSON report"
            )
