"""`hairtrace replay`, `export` and `diff`: sessions analysed without root or BPF."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from tracer.cli_output import check_writable, fail, write_json
from tracer.errors import EXIT_BROKEN, HairtraceError, UsageError


def _warn(warnings: Sequence[str]) -> None:
    for w in warnings:
        click.echo(f"hairtrace: warning: {w}", err=True)


STREAM_ABOVE = 16 << 20  # bytes: bigger sessions are replayed streaming by default


@click.command()
@click.argument("session", metavar="FILE")
@click.option("--json", "json_dest", metavar="FILE|-", help="Write the JSON report.")
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Analyse connection by connection in bounded memory, or all events at once "
    f"(default: streaming for sessions over {STREAM_ABOVE >> 20} MiB).",
)
def replay(session: str, json_dest: str | None, stream: bool | None) -> None:
    """Analyse a recorded session exactly as the live trace did (no root, no BPF).

    Exit status as for a live trace: 0 none broken, 3 at least one broken.
    """
    from tracer.present.live import render_summary
    from tracer.present.report import build, exit_status
    from tracer.session import replay as replay_session

    try:
        if json_dest:
            check_writable(json_dest, "--json")  # before the replay, not after it
        if stream if stream is not None else _size(session) > STREAM_ABOVE:
            status = _replay_streaming(session, json_dest)
        else:
            res = replay_session(session)
            _warn(res.warnings)
            render_summary(res)
            if json_dest:
                write_json(build(res.run, res.results), json_dest)
            status = exit_status(res.results)
    except HairtraceError as exc:
        fail(exc)
    sys.exit(status)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # the replay says what is wrong with it


def _replay_streaming(session: str, json_dest: str | None) -> int:
    """`replay` in bounded memory: the summary gathers connections and the report is
    written as the engine judges them. The exit status."""
    from tracer.analysis.finalize import Finished
    from tracer.present import live
    from tracer.present.reportfile import ReportFile, ReportWriter
    from tracer.session import open_session
    from tracer.session.replay import replay_stream, run_info

    digest = live.new_digest()
    out = writer = None
    if json_dest:
        reader = open_session(session)  # the head: what the recording says at its start
        out = ReportFile(json_dest)
        writer = ReportWriter(out.stream)
        writer.begin(run_info(reader.header, reader.footer, 0))

    def take(done: Finished) -> None:
        digest.add(*done)
        if writer is not None:
            writer.add(done.conn, done.diag)

    try:
        res = replay_stream(session, take)
        if writer is not None and out is not None:
            writer.end(res.run)
            out.done()
    except BaseException:
        if out is not None:
            out.abandon()
        raise
    _warn(res.warnings)
    live.render_digest(res.run, digest)
    return EXIT_BROKEN if digest.broken else 0


@click.command()
@click.argument("session", metavar="FILE")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "jsonl"]), required=True)
@click.option(
    "--out", metavar="PATH|-", help="Output file (default: FILE with the format's suffix)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def export(session: str, fmt: str, out: str | None, force: bool) -> None:
    """Export a session's events, one row per event (streamed: bounded memory)."""
    from tracer.session import default_out, export_session

    target = sys.stdout.buffer if out == "-" else (out or default_out(session, fmt))
    try:
        if out != "-":  # before the export, not after it
            check_writable(str(target), "--out" if out else "export output")
        summary = export_session(session, fmt, target, overwrite=force)
    except HairtraceError as exc:
        fail(exc)
    _warn(summary.warnings)
    if out != "-":
        click.echo(f"{summary.rows} events -> {summary.out}", err=True)


def load_report(path: str) -> dict[str, Any]:
    """A JSON report as it is, or a session file replayed into one."""
    from tracer.analysis.diff import parse_reports
    from tracer.present.report import build
    from tracer.session import replay as replay_session
    from tracer.session.format import MAGIC

    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
            if head == MAGIC:
                res = replay_session(path)
                _warn([f"{path}: {w}" for w in res.warnings])
                return build(res.run, res.results)
            text = (head + fh.read()).decode(errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    reports = parse_reports(text, path)
    if len(reports) != 1:
        raise UsageError(f"{path} holds {len(reports)} reports, expected one")
    return reports[0]


@click.command()
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff(a: str, b: str, as_json: bool) -> None:
    """Compare two traces of the same scenario (JSON reports or session files).

    Aligns connections by role (client, service, backend, packet role) and shows
    per packet role the first hop where the paths diverge, and verdict changes.
    Traces from different providers are compared at the stages both share.
    Exit status: 0 equivalent, 3 different.
    """
    from tracer.analysis.diff import diff_sources, render_text

    try:
        result = diff_sources(a, b, load_report)
    except HairtraceError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(render_text(result), nl=False)
    sys.exit(0 if result.equivalent else EXIT_BROKEN)


def register(main: click.Group) -> None:
    """Attach the session commands to the main group."""
    main.add_command(replay)
    main.add_command(export)
    main.add_command(diff)
