"""--metrics: the exposition of judged connections and of the trace's counters, the
`service` label, the endpoint's lifetime, and bad addresses as one-line usage errors."""

from __future__ import annotations

import socket
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tracer import trace
from tracer.analysis.finalize import Finished
from tracer.cli import main
from tracer.errors import HairtraceError, UsageError
from tracer.options import parse_listen_address
from tracer.present import live, report
from tracer.present.metrics import TraceCounters, TraceMetrics, service_label, service_names
from tracer.session import replay
from tracer.topology.model import ServiceEntry

FAULTS = Path(__file__).resolve().parent.parent / "fixtures" / "faults"
SVC = "100.67.30.133"


@pytest.fixture
def metrics() -> Iterator[TraceMetrics]:
    m = TraceMetrics("127.0.0.1", 0)
    try:
        yield m
    finally:
        m.close()


def _samples(m: TraceMetrics, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one family in the exposition text, by their labels."""
    text = generate_latest(m.registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == family:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _connections(m: TraceMetrics) -> Counter[tuple[str, str, str]]:
    return Counter(
        {
            (d["service"], d["verdict"], d["cause"]): int(v)
            for d, v in (
                (dict(k), v) for k, v in _samples(m, "hairtrace_connections_total").items()
            )
        }
    )


def _finished(name: str) -> tuple[list[Finished], list[dict[str, object]]]:
    """A recorded fault's judged connections, and its report's connections."""
    res = replay(FAULTS / f"{name}.hts")
    done = [Finished((i, 0, i), c, d) for i, (c, d) in enumerate(res.results)]
    return done, report.build(res.run, res.results)["connections"]


@pytest.mark.parametrize("name", ["vxlan-fdb-missing", "dns-bridge-nf-off", "two-node", "none"])
def test_connection_counts_are_the_reports(metrics: TraceMetrics, name: str) -> None:
    done, conns = _finished(name)
    metrics.start(None, TraceCounters)
    metrics.judged(done[:1])  # judged in two batches, as the trace hands them over
    metrics.judged(done[1:])
    want: Counter[tuple[str, str, str]] = Counter()
    for c in conns:
        svc, brk = c["service"], c["break"]
        assert isinstance(svc, dict)
        cause = brk["cause"] if isinstance(brk, dict) else ""
        want[(f"{svc['ip']}:{svc['port']}", str(c["verdict"]), cause)] += 1
    assert want and _connections(metrics) == want


def test_connection_counts_add_up_over_batches(metrics: TraceMetrics) -> None:
    done, _ = _finished("vxlan-fdb-missing")
    metrics.start(None, TraceCounters)
    for _ in range(3):
        metrics.judged(done)
    got = _connections(metrics)
    assert got == {
        (f"{SVC}:80", "broken", "overlay-no-remote"): 3 * 4,
        (f"{SVC}:80", "ok", ""): 3 * 2,
    }


def test_no_connection_yet_is_an_empty_family(metrics: TraceMetrics) -> None:
    metrics.start(None, TraceCounters)
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE hairtrace_connections_total counter" in text
    assert "hairtrace_connections_total{" not in text


def test_service_label_by_name_and_by_address() -> None:
    done, _ = _finished("dns-bridge-nf-off")
    [udp] = [f.conn for f in done]
    (tcp_done, _) = _finished("bridge-nf-off")
    tcp = tcp_done[0].conn
    entries = [
        ServiceEntry(SVC, 80, "tcp", "prod/export", endpoints=("100.96.54.247:80",)),
        ServiceEntry("100.67.30.140", 53, "tcp", "kube-system/kube-dns", "dns-tcp"),
        ServiceEntry("100.67.30.141", 53, "udp", None),  # hand-written rules: no name
    ]
    names = service_names(entries)
    assert service_label(tcp, names) == "prod/export"
    # the UDP flow is 100.67.30.140:53/udp: the rules name only its TCP port
    assert service_label(udp, names) == "100.67.30.140:53"
    names = service_names(
        [*entries, ServiceEntry("100.67.30.140", 53, "udp", "kube-system/kube-dns")]
    )
    assert service_label(udp, names) == "kube-system/kube-dns"
    assert service_label(tcp, service_names(None)) == f"{SVC}:80"
    assert service_label(tcp, service_names([ServiceEntry(SVC, 8080, "tcp", "prod/x")])) == (
        f"{SVC}:80"
    )


def test_labels_of_many_services_in_one_trace(metrics: TraceMetrics) -> None:
    """The node's entries name each connection by its own destination."""
    tcp, _ = _finished("vxlan-fdb-missing")
    udp, _ = _finished("dns-bridge-nf-off")
    metrics.start(
        [
            ServiceEntry(SVC, 80, "tcp", "prod/export"),
            ServiceEntry("100.67.30.140", 53, "udp", "kube-system/kube-dns", "dns"),
        ],
        TraceCounters,
    )
    metrics.judged([*tcp, *udp])
    assert _connections(metrics) == {
        ("prod/export", "broken", "overlay-no-remote"): 4,
        ("prod/export", "ok", ""): 2,
        ("kube-system/kube-dns", "broken", "bridge-nf-call-iptables-off"): 1,
    }


def test_counters_are_read_when_scraped(metrics: TraceMetrics) -> None:
    now = {"c": TraceCounters(10, {"kfree_skb": 3}, {"netif_receive_skb": 7, "point-30": 1})}
    metrics.start(None, lambda: now["c"])
    assert _samples(metrics, "hairtrace_events_total") == {(): 10}
    lost = _samples(metrics, "hairtrace_events_lost_total")
    assert lost[(("point", "kfree_skb"),)] == 3
    assert lost[(("point", "netif_receive_skb"),)] == 0, "every point, 0 without losses"
    over = _samples(metrics, "hairtrace_over_budget_events_total")
    assert over[(("point", "netif_receive_skb"),)] == 7
    assert over[(("point", "point-30"),)] == 1, "a point the tables do not name still counts"
    now["c"] = TraceCounters(25, {"kfree_skb": 5}, {})
    assert _samples(metrics, "hairtrace_events_total") == {(): 25}
    assert _samples(metrics, "hairtrace_events_lost_total")[(("point", "kfree_skb"),)] == 5


def test_own_process_and_nothing_of_the_default_registry(metrics: TraceMetrics) -> None:
    metrics.start(None, TraceCounters)
    text = generate_latest(metrics.registry).decode()
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
    assert "python_gc_objects_collected_total" not in text, "the global registry's"


def test_served_from_start_to_close() -> None:
    m = TraceMetrics("127.0.0.1", 0)
    port = m.port
    done, _ = _finished("bridge-nf-off")
    m.start(None, lambda: TraceCounters(4))
    m.judged(done)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert (
        'hairtrace_connections_total{cause="bridge-nf-call-iptables-off",'
        f'service="{SVC}:80",verdict="broken"}} 1.0'
    ) in body
    assert "hairtrace_events_total 4.0" in body
    m.close()
    m.close()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    TraceMetrics("127.0.0.1", port).close()  # the port is free again


def test_ipv6_loopback() -> None:
    try:
        m = TraceMetrics("::1", 0)
    except UsageError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        m.start(None, TraceCounters)
        body = urllib.request.urlopen(f"http://[::1]:{m.port}/", timeout=5).read()
        assert b"hairtrace_events_total 0.0" in body
    finally:
        m.close()


def test_busy_port_is_a_usage_error(metrics: TraceMetrics) -> None:
    with pytest.raises(
        UsageError, match=r"127\.0\.0\.1:\d+: cannot listen: Address already in use"
    ):
        TraceMetrics("127.0.0.1", metrics.port)


def test_a_failed_load_releases_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def no_load(_opts: trace.TraceOptions) -> None:
        raise HairtraceError("no BPF here")

    monkeypatch.setattr(trace, "_load", no_load)
    opts = trace.TraceOptions(SVC, 80, metrics=("127.0.0.1", port))
    with pytest.raises(HairtraceError, match="no BPF here"):
        trace.run_trace(opts)
    TraceMetrics("127.0.0.1", port).close()


@pytest.mark.parametrize(
    "spec,want",
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:65535", ("::", 65535)),
        ("localhost:9464", ("localhost", 9464)),
        ("node-1.example:80", ("node-1.example", 80)),
    ],
)
def test_listen_addresses(spec: str, want: tuple[str, int]) -> None:
    assert parse_listen_address(spec) == want


def _cli(*args: str) -> tuple[int, list[str]]:
    res = CliRunner().invoke(main, ["--svc", SVC, "--no-live", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, [ln for ln in res.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("9464", "expected HOST:PORT"),
        (":9464", "expected HOST:PORT"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:0", "bad --metrics port '0': expected 1-65535"),
        ("127.0.0.1:70000", "bad --metrics port '70000'"),
        ("127.0.0.1:http", "bad --metrics port 'http'"),
        ("1.2.3:9464", "expected HOST:PORT"),
        ("300.1.1.1:9464", "expected HOST:PORT"),
        ("::1:9464", "an IPv6 address goes in brackets: [::1]:PORT"),
        ("[::1]9464", "an IPv6 address goes in brackets"),
        ("[1.2.3.4]:9464", "[1.2.3.4] is no IPv6 address"),
        ("under_score:9464", "expected HOST:PORT"),
    ],
)
def test_bad_metrics_value_is_one_line_exit_2(
    spec: str, needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "run_trace", _never)
    code, lines = _cli("--metrics", spec)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("hairtrace: error: ") and needle in lines[0]


def test_busy_or_foreign_address_fails_before_loading(
    metrics: TraceMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace, "_load", _never)
    for addr, needle in [
        (f"127.0.0.1:{metrics.port}", "cannot listen: Address already in use"),
        ("192.0.2.1:9464", "cannot listen: Cannot assign requested address"),  # TEST-NET-1
        ("no-such-host.invalid:9464", "cannot resolve no-such-host.invalid"),
    ]:
        code, lines = _cli("--metrics", addr, "--duration", "1")
        assert code == 2, lines
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"hairtrace: error: --metrics {addr}: ") and needle in lines[0]


def _never(*_args: object, **_kw: object) -> None:
    raise AssertionError("must not be reached")
