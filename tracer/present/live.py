"""The rich live view and the end-of-trace summary (on stderr; stdout stays for JSON)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.finalize import Finished
from tracer.analysis.reassemble import Connection
from tracer.events.model import service_label
from tracer.present.digest import Digest
from tracer.present.report import RunInfo
from tracer.present.reportfile import ReportFile, ReportWriter
from tracer.present.services import ServiceKey, service_key, service_text, tally_text
from tracer.trace import Stats, TraceOptions, TraceResult, run_trace

_STYLE = {"ok": "green", "broken": "bold red", "recovered": "yellow", "incomplete": "magenta"}


def _console() -> Console:
    # Logs and pipes get a readable width instead of rich's 80-column fallback.
    probe = Console(stderr=True)
    return Console(stderr=True, highlight=False, width=None if probe.is_terminal else 140)


def _header(run: RunInfo) -> Text:
    return Text.from_markup(
        f"[bold]hairtrace[/] {run.tool_version}  service "
        f"{escape(_named(run))} ({', '.join(run.protocols)})  netns "
        f"{run.netns}  kernel {run.kernel}\nbackend {run.backend_reason or run.backend}\n"
        f"provider {run.provider_reason}; "
        f"attached {len(run.attached)} programs in {run.trace_attach_seconds or 0:.3f}s "
        f"({run.attach_seconds or 0:.3f}s after process start)"
        + "".join(f"\n  skipped {k}: {v}" for k, v in run.skipped.items())
        + "".join(f"\n[bold yellow]warning:[/] {escape(w)}" for w in run.warnings)
    )


def _named(run: RunInfo) -> str:
    """ "prod/export 100.67.30.133:80" when the rules name the Service, else the address
    ("100.64.0.0/10 (2 Services)" for a range)."""
    if run.service_prefix < 32:
        n = len({(ip, port) for ip, port, _proto in run.service_names})
        return f"{run.service_ip}/{run.service_prefix} ({n} named Service port(s) in the rules)"
    addr = service_label(run.service_ip, run.service_port)
    if run.service_name is None:
        return addr
    port = f":{run.service_port_name}" if run.service_port_name else ""
    return f"{run.service_name}{port} {addr}"


def _announce(console: Console) -> Callable[[RunInfo], None]:
    """Without a live view, what must be said at start: the warnings, at once."""

    def announce(run: RunInfo) -> None:
        for w in run.warnings:
            console.print(f"[bold yellow]warning:[/] {escape(w)}")

    return announce


MAX_ROWS = 25  # beyond this, ok rows are tallied instead of listed
MAX_BAD_ROWS = 200  # beyond this, connections that are not ok are counted, not listed


def new_digest() -> Digest:
    """The Digest the live view and the summary gather connections in."""
    return Digest(MAX_ROWS, max_bad_rows=MAX_BAD_ROWS)


def _range_names(run: RunInfo | None) -> dict[ServiceKey, str] | None:
    """The Service names the table shows: a range's (one Service's name is in the head)."""
    return dict(run.service_names) if run is not None and run.service_prefix < 32 else None


def _service_cell(conn: Connection, names: dict[ServiceKey, str] | None) -> str:
    if names is None:
        return f"{conn.key.dst}:{conn.key.dport}/{conn.proto}"
    ip, port, proto = key = service_key(conn)
    name = names.get(key)
    return f"{ip}:{port}/{proto}\n{name}" if name else f"{ip}:{port}/{proto}"


def _services_table(digest: Digest, names: dict[ServiceKey, str] | None) -> Table:
    """A range's connections by Service: verdicts and causes."""
    table = Table(expand=True, show_lines=False, title="by Service")
    for col in ("service", "connections", "ok", "broken", "other", "causes"):
        table.add_column(col)
    for row in digest.services.rows(names):
        key = (row["ip"], row["port"], row["proto"])
        other = row["connections"] - row["ok"] - row["broken"]
        causes = ", ".join(f"{c} {n}" for c, n in row["causes"].items())
        table.add_row(service_text(key, names), str(row["connections"]),
                      Text(str(row["ok"]), style="green" if row["ok"] else ""),
                      Text(str(row["broken"]), style="bold red" if row["broken"] else ""),
                      str(other), causes)  # fmt: skip
    return table


def _digest_table(
    digest: Digest,
    open_now: Sequence[Finished] = (),
    names: dict[ServiceKey, str] | None = None,
) -> Table:
    """The connections judged (digest) and, in a live view, the open ones that already
    show a break (open_now: provisional verdicts); names: a range's Service names."""
    table = Table(expand=True, show_lines=False)
    for col in ("client", "service", "backend", "packets", "verdict", "where / cause"):
        table.add_column(col)
    shown, hidden = digest.shown()
    if hidden:
        bad = digest.hidden_not_ok
        more = f"{hidden - bad} more ok" + (f" and {bad} more not ok" if bad else "")
        table.caption = f"... and {more} connection(s) not listed ({digest.tally()})"
    for conn, diag in shown:
        backend = _backend(conn)
        roles = compact_roles(packet_labels(conn))
        where = ""
        if diag.brk:
            b = diag.brk
            where = f"{b.where}: {b.cause}"
        table.add_row(
            _client(conn),
            _service_cell(conn, names),
            backend,
            roles,
            Text(diag.verdict, style=_STYLE.get(diag.verdict, "")),
            where,
        )
    breaking = [f for f in open_now if f.diag.brk is not None]
    for f in breaking[:MAX_ROWS]:
        conn, brk = f.conn, f.diag.brk
        assert brk is not None
        table.add_row(
            _client(conn),
            _service_cell(conn, names),
            _backend(conn),
            compact_roles(packet_labels(conn)),
            Text(f"{f.diag.verdict} (open)", style=_STYLE.get(f.diag.verdict, "")),
            f"{brk.where}: {brk.cause}",
        )
    if open_now:
        more = (
            f"; {len(breaking) - MAX_ROWS} more open ones broken"
            if len(breaking) > MAX_ROWS
            else ""
        )
        table.caption = (table.caption + "\n" if table.caption else "") + (
            f"{len(open_now)} connection(s) still open{more}"
        )
    return table


def _client(conn: Connection) -> str:
    """ "100.96.54.240:33556" and, on the next line, the pod holding it when known."""
    addr = f"{conn.key.src}:{conn.key.sport}"
    return f"{addr}\n{conn.client_pod}" if conn.client_pod else addr


def _backend(conn: Connection) -> str:
    if conn.backend is None:
        return "-"
    addr = f"{conn.backend[0]}:{conn.backend[1]}"
    return f"{addr}\n{conn.backend_pod}" if conn.backend_pod else addr


def packet_labels(conn: Connection) -> list[str]:
    """A connection's packets in a word each: TCP roles; UDP and UDP-REPLY; ICMP."""
    return [
        "UDP-REPLY" if p.role == "UDP" and p.direction == "reply" else p.role for p in conn.packets
    ]


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


class TraceView:
    """A live trace's sink: the summary's Digest, the JSON report (written to `report` as
    connections are judged, when given) and, when live, the rich table redrawn as they
    are; a break shows the moment it is known, while its connection is still open."""

    def __init__(self, console: Console, live: bool, report: str | None = None) -> None:
        self.console = console
        self.live = live
        self.digest = new_digest()
        self._report = report
        self._file: ReportFile | None = None
        self._writer: ReportWriter | None = None
        self._view: Live | None = None
        self.header = Text("")
        self._run: RunInfo | None = None

    def attached(self, run: RunInfo) -> None:
        self.header = _header(run)
        self._run = run
        if self._report:
            self._file = ReportFile(self._report)
            self._writer = ReportWriter(self._file.stream)
            self._writer.begin(run)
        if self.live:
            self._view = Live(
                Group(self.header, Text("waiting for packets...")),
                console=self.console,
                refresh_per_second=4,
                transient=True,
            )
            self._view.start()

    def judged(self, done: list[Finished]) -> None:
        for f in done:
            self.digest.add(*f)
            if self._writer is not None:
                self._writer.add(f.conn, f.diag)

    def update(self, open_now: list[Finished], stats: Stats) -> None:
        if self._view is not None:
            names = _range_names(self._run)
            table = _digest_table(self.digest, open_now, names)
            if names is None:
                self._view.update(Group(self.header, table, _losses(stats)))
            else:
                by_service = _services_table(self.digest, names)
                self._view.update(Group(self.header, table, by_service, _losses(stats)))

    def close(self) -> None:
        if self._view is not None:
            self._view.stop()
            self._view = None

    def finish_report(self, run: RunInfo) -> None:
        """The report's tail (run: the trace's final RunInfo); the report is complete."""
        if self._writer is not None and self._file is not None:
            self._writer.end(run)
            self._file.done()
            self._writer = self._file = None

    def discard(self) -> None:
        """No report after all (the trace failed): a partial file goes."""
        if self._file is not None:
            self._file.abandon()
            self._writer = self._file = None


def trace_with_view(
    opts: TraceOptions, live: bool, *, report: str | None = None, keep_results: bool = False
) -> tuple[TraceResult, TraceView]:
    """Trace with the live table (when live), then write the report (to `report`, when
    given: a path or '-') and print the summary. The view holds the summary's digest."""
    console = _console()
    view = TraceView(console, live, report)
    try:
        result = run_trace(
            opts,
            view,
            announce=None if live else _announce(console),
            keep_results=keep_results,
        )
        view.close()
        view.finish_report(result.run)
    except BaseException:
        view.close()
        view.discard()
        raise
    render_digest(result.run, view.digest, console)
    return result, view


class Outcome(Protocol):
    """A live trace's result or a replayed session's: what the summary needs."""

    @property
    def run(self) -> RunInfo: ...

    @property
    def results(self) -> list[tuple[Connection, Diagnosis]]: ...


def render_summary(result: Outcome, console: Console | None = None) -> None:
    """Everything a person needs at the end: table, then each break in full."""
    render_digest(
        result.run, Digest.of(result.results, MAX_ROWS, max_bad_rows=MAX_BAD_ROWS), console
    )


def render_digest(run: RunInfo, digest: Digest, console: Console | None = None) -> None:
    """render_summary of the connections gathered in digest (a streamed replay)."""
    console = console or _console()
    console.print(_header(run))
    names = _range_names(run)
    console.print(_digest_table(digest, names=names))
    if names is not None and digest.total:
        console.print(_services_table(digest, names))
    console.print(_run_losses(run))
    if not digest.total:
        console.print("no connection to the service was seen")
    else:
        console.print(digest.tally())
    if names is not None:
        for row in digest.services.rows(names):
            key = (row["ip"], row["port"], row["proto"])
            console.print(f"  {service_text(key, names)}: {tally_text(row)}")
    with_notes, more_notes = digest.notes()
    for conn, diag in with_notes:
        for note in diag.notes:
            console.print(f"[magenta]note[/] {conn.key}: {note}")
    if more_notes:
        console.print(f"[magenta]note[/] {more_notes} more note(s): each is in the JSON report")
    breaks = digest.breaks()
    for (conn, diag), _n in breaks:
        b = diag.brk
        assert b is not None
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
    for (_conn, diag), n in breaks:
        if n > 1 and diag.brk is not None:
            console.print(
                f"{n - 1} more connection(s) {diag.verdict} the same way: {diag.brk.cause}, "
                f"{diag.brk.where}; each is in the JSON report"
            )
