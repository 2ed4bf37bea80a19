"""Prometheus metrics of a live trace (`--metrics HOST:PORT`).

What is exported: the judged connections by Service, verdict and cause; the trace's own
cumulative counters (events, losses, over-budget packets per probe point), read when
scraped; the tracer's CPU and memory (prometheus_client's ProcessCollector). All on a
registry of this trace's own, served by prometheus_client's WSGI app from a thread of its
own: a scrape never waits for the drain loop, nor the loop for a scrape. A library: it
never prints (request logs and handler errors go nowhere).
"""

from __future__ import annotations

import io
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from tracer.analysis.finalize import Finished
from tracer.analysis.reassemble import Connection
from tracer.errors import UsageError
from tracer.events.model import POINTS
from tracer.topology.model import ServiceEntry

# every probe point, so a point without losses is a 0 (rate() and sum() work from the start)
_POINT_NAMES = tuple(p.name for p in POINTS.values())

ServiceNames = Mapping[tuple[str, int, str], str]  # (ip, port, proto) -> "namespace/name"


def service_names(entries: Iterable[ServiceEntry] | None) -> dict[tuple[str, int, str], str]:
    """The Services kube-proxy's rules name, by address, port and protocol (the node's
    ServiceEntry list; None: no rules known)."""
    return {(e.ip, e.port, e.proto): e.name for e in entries or () if e.name}


def service_label(conn: Connection, names: ServiceNames) -> str:
    """The `service` label of a connection: the Service's "namespace/name" when the node's
    rules name the one at its conntrack original destination, else that "IP:PORT"."""
    key = conn.key
    return names.get((key.dst, key.dport, conn.proto)) or f"{key.dst}:{key.dport}"


@dataclass(frozen=True)
class TraceCounters:
    """The trace's cumulative counters as they are now (what the report says at the end:
    events, lost_by_point, over_budget_by_point)."""

    events: int = 0
    lost_by_point: Mapping[str, int] = field(default_factory=dict)
    over_budget_by_point: Mapping[str, int] = field(default_factory=dict)


class _TraceCollector(Collector):
    """Connections counted as they are judged; the trace's counters read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # judged() runs in the trace, collect() in a scrape
        self._connections: Counter[tuple[str, str, str]] = Counter()
        self.counters: Callable[[], TraceCounters] = TraceCounters

    def add(self, labels: Counter[tuple[str, str, str]]) -> None:
        with self._lock:
            self._connections.update(labels)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            connections = sorted(self._connections.items())
        family = CounterMetricFamily(
            "hairtrace_connections",
            "Connections judged, by Service, verdict and the break's cause (empty without one).",
            labels=["service", "verdict", "cause"],
        )
        for labels, n in connections:
            family.add_metric(list(labels), n)
        yield family
        now = self.counters()
        yield CounterMetricFamily(
            "hairtrace_events", "Events read from the ring buffer.", value=now.events
        )
        yield _per_point(
            "hairtrace_events_lost",
            "Events the probes could not write to the ring buffer, by probe point.",
            now.lost_by_point,
        )
        yield _per_point(
            "hairtrace_over_budget_events",
            "Packets past the --data-packets budget, counted in the kernel and not "
            "emitted, by probe point.",
            now.over_budget_by_point,
        )


def _per_point(name: str, doc: str, by_point: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["point"])
    for point in sorted({*_POINT_NAMES, *by_point}):
        family.add_metric([point], by_point.get(point, 0))
    return family


class _QuietHandler(WSGIRequestHandler):
    """No request log, no traceback of a scraper that hung up: nothing on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def get_stderr(self) -> io.StringIO:
        return io.StringIO()


class _Server(ThreadingMixIn, WSGIServer):
    """prometheus_client's ThreadingWSGIServer, for either address family."""

    daemon_threads = True
    allow_reuse_address = True  # a port in TIME_WAIT, not one another process listens on

    def __init__(self, address: tuple[Any, ...], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, _QuietHandler)

    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # HTTPServer's would look the host's name up in DNS
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def _bind(host: str, port: int) -> _Server:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--metrics {where}: cannot resolve {host}: {exc.strerror}") from None
    family, _type, _proto, _name, address = infos[0]
    try:
        return _Server(address, family)
    except OSError as exc:
        raise UsageError(f"--metrics {where}: cannot listen: {exc.strerror}") from None


class TraceMetrics:
    """The metrics endpoint of one trace. Bound when made (before anything loads, so a bad
    or busy address fails at once), served from start() (every probe attached) to close()
    (the trace ended); a scrape that comes in between waits in the listen queue."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._trace = _TraceCollector()
        self.registry.register(self._trace)
        self._names: ServiceNames = {}
        self._server = _bind(host, port)
        self._server.set_app(make_wsgi_app(self.registry))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one asked for, or the kernel's pick for 0)."""
        return int(self._server.server_address[1])

    def start(
        self, entries: Iterable[ServiceEntry] | None, counters: Callable[[], TraceCounters]
    ) -> None:
        """Serve: entries name the node's Services, counters() reads the trace's now."""
        self._names = service_names(entries)
        self._trace.counters = counters
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="hairtrace-metrics",
            daemon=True,
        )
        self._thread.start()

    def judged(self, done: Iterable[Finished]) -> None:
        """Connections just judged: each counted once under its labels."""
        labels: Counter[tuple[str, str, str]] = Counter()
        for f in done:
            cause = f.diag.brk.cause if f.diag.brk is not None else ""
            labels[(service_label(f.conn, self._names), f.diag.verdict, cause)] += 1
        if labels:
            self._trace.add(labels)

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
