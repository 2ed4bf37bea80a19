"""The hairtrace command line: parse, call the library, render. Nothing else."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from tracer import __version__
from tracer.cli_output import check_writable, fail
from tracer.errors import EXIT_BROKEN, EXIT_USAGE, HairtraceError, UsageError
from tracer.options import DEFAULT_DATA_BUDGET


class _UsageLine(click.ClickException):
    """A click usage error, shown as every hairtrace error is: one line on stderr."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        click.echo(f"hairtrace: error: {self.format_message()}", err=True)


# click >= 8.2 raises this for a group called without its command: it shows the help
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


@contextmanager
def _usage_in_one_line() -> Iterator[None]:
    try:
        yield
    except click.UsageError as exc:
        if isinstance(exc, _NO_ARGS_HELP):
            raise
        raise _UsageLine(exc.format_message()) from exc


class _Main(click.Group):
    """`hairtrace --svc ...` traces; `hairtrace lab|demo` are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["command"] = tuple(args[i + 1 :])
            args = args[:i]
        return super().parse_args(ctx, args)

    # Every usage error of the group and of all its subcommands (at any depth) is raised
    # while the group parses its own arguments or invokes a subcommand, which parses its
    # own: turned into one line there, click's standalone handling (help, --version,
    # exit codes, broken pipes) stays as it is.
    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _usage_in_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_in_one_line():
            return super().invoke(ctx)


@click.group(
    cls=_Main, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--svc",
    "svc",
    metavar="IP|NS/NAME[:PORT][/tcp|/udp]|CIDR[/tcp|/udp]",
    help="Service to trace: its ClusterIP, or NAMESPACE/NAME (with :PORT or :PORTNAME) "
    "resolved from kube-proxy's rules in the node netns, or every Service of a range "
    "(IP/LEN, e.g. 10.96.0.0/12: no port); without /PROTO both TCP and UDP.",
)
@click.option(
    "--netns",
    metavar="NAME|PATH",
    help="Node network namespace for the netfilter probes (default: the caller's).",
)
@click.option("--duration", type=float, metavar="S", help="Stop after S seconds.")
@click.option(
    "--json",
    "json_dest",
    metavar="FILE|-",
    help="Write the JSON report to FILE, or to stdout for '-' (stdout then holds the "
    "report only: the output of -- CMD goes to stderr).",
)
@click.option(
    "--provider",
    type=click.Choice(["auto", "fentry", "kprobe", "tracepoint"]),
    default="auto",
    show_default=True,
    help="Probe provider.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "core", "bcc"]),
    default="auto",
    show_default=True,
    help="BPF toolchain: core = libbpf CO-RE (needs kernel BTF or --btf), bcc = compiled at "
    "start-up against the kernel's headers (python3-bpfcc); auto = core where there is BTF.",
)
@click.option(
    "--btf",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="External BTF file for the running kernel (CO-RE on a kernel built without BTF).",
)
@click.option("--no-live", is_flag=True, help="No live view; print the summary at the end.")
@click.option(
    "--all-netns",
    is_flag=True,
    help="Analyse every network namespace, not only the node's and those joined to it by "
    "veth pairs (its pods). Identical tuples in different namespaces then count as one "
    "connection.",
)
@click.option(
    "--data-packets",
    type=click.IntRange(0, 255),
    default=DEFAULT_DATA_BUDGET,
    show_default=True,
    metavar="N",
    help="TCP packets without SYN, FIN or RST, and UDP datagrams, traced per connection "
    "direction, probe point and device: the handshake's last ACK and the first data; a UDP "
    "flow's first requests and replies. Later ones cost a map lookup, not an event (the "
    "report counts them). 0 traces every packet.",
)
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at HOST:PORT ([::1]:PORT for IPv6) while tracing: "
    "connections by Service, verdict and cause; events, losses; the tracer's CPU and memory.",
)
@click.option("--record", metavar="FILE", help="Record the session to FILE (see `replay`).")
@click.option("--force", is_flag=True, help="With --record: overwrite an existing FILE.")
@click.option(
    "--record-rotate",
    metavar="LIMIT",
    help="With --record: close FILE when it passes LIMIT, a size (64K, 500M, 2G) or a time "
    "(30m, 6h, 1d), as FILE's stem.0001.suffix ... and start a new FILE. Older segments than "
    "--record-keep are deleted unless a connection judged not ok has events in them.",
)
@click.option(
    "--record-keep",
    type=int,
    default=3,
    show_default=True,
    metavar="N",
    help="With --record-rotate: closed segments kept whatever they hold (the newest N).",
)
@click.option("--ready-file", hidden=True, help="Write this file once attached (tests).")
@click.option("--ringbuf-bytes", type=int, hidden=True, help="Ring buffer size (tests).")
@click.version_option(__version__, prog_name="hairtrace")
@click.pass_context
def main(
    ctx: click.Context,
    svc: str | None,
    netns: str | None,
    duration: float | None,
    json_dest: str | None,
    provider: str,
    backend: str,
    btf: str | None,
    no_live: bool,
    all_netns: bool,
    data_packets: int,
    record: str | None,
    force: bool,
    record_rotate: str | None,
    record_keep: int,
    ready_file: str | None,
    ringbuf_bytes: int | None,
    metrics: str | None,
) -> None:
    """Trace every connection to a Service (TCP, UDP flows and their ICMP errors) and
    explain where it breaks.

    \b
    hairtrace --svc 100.67.30.133 [--netns NODE] [--json r.json] [-- CMD ...]
    hairtrace --svc 10.96.0.10:53/udp ...
    hairtrace --svc prod/export[:PORT|:PORTNAME][/tcp|/udp] ...  (kube-proxy's rules name it)
    hairtrace --svc 10.96.0.0/12[/tcp|/udp] ...  (every Service of the range, by Service)

    With `-- CMD`, CMD runs once every probe is attached and the trace ends
    shortly after it exits. Exit status: 0 all traced connections ok (or none
    broken), 3 at least one broken, 2 usage error, 1 other failure.
    """
    if ctx.invoked_subcommand is not None:
        return
    command = ctx.meta.get("command", ())
    if svc is None:
        click.echo(ctx.get_help(), err=True)
        sys.exit(EXIT_USAGE)
    from tracer.options import parse_listen_address, parse_service_target
    from tracer.present.live import trace_with_view
    from tracer.trace import TraceOptions

    try:
        target = parse_service_target(svc)
        listen = parse_listen_address(metrics) if metrics is not None else None
        if duration is not None and duration <= 0:
            raise UsageError("--duration must be positive")
        # before anything loads or attaches: a bad path found at the end loses the trace
        if json_dest:
            check_writable(json_dest, "--json")
        if record:
            check_writable(record, "--record")
        if record_rotate is not None:
            from tracer.session.rotate import check_keep, parse_limit

            if not record:
                raise UsageError("--record-rotate needs --record FILE")
            parse_limit(record_rotate)
            check_keep(record_keep)
        elif ctx.get_parameter_source("record_keep") is not click.core.ParameterSource.DEFAULT:
            raise UsageError("--record-keep needs --record-rotate LIMIT")
        opts = TraceOptions(
            target.ip or "",
            target.port,
            netns,
            duration,
            tuple(command),
            provider,
            ringbuf_bytes=ringbuf_bytes,
            ready_file=ready_file,
            record=record,
            force=force,
            record_rotate=record_rotate,
            record_keep=record_keep,
            all_netns=all_netns,
            backend=backend,
            btf=btf,
            data_budget=data_packets,
            command_stdout_to_stderr=json_dest == "-",
            protocols=target.protocols,
            service_name=target.name,
            service_port_name=target.port_name,
            metrics=listen,
            service_prefix=target.prefix,
        )
        live = not no_live and sys.stderr.isatty()
        _result, view = trace_with_view(opts, live, report=json_dest)
    except HairtraceError as exc:
        fail(exc)
    except KeyboardInterrupt:  # Ctrl-C before the probes were attached: nothing to report
        click.echo("hairtrace: interrupted before tracing started", err=True)
        sys.exit(130)
    sys.exit(EXIT_BROKEN if view.digest.broken else 0)


from tracer import cli_lab, cli_session  # registers lab, demo, doctor, replay, export, diff

cli_lab.register(main)
cli_session.register(main)

if __name__ == "__main__":  # pragma: no cover
    main()
