"""The labs' kube-dns Service: dig's output parsed, dnsmasq's options, and DNS over the
ClusterIP in the cluster lab (both proxy modes) and in scripts/seed-lab.sh.

The live tests build their own namespaces (prefix htdns, and dns-node/dns-poda/dns-podb
for the script) and tear them down in fixture finalizers, whatever the outcome.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tracer.errors import UsageError
from tracer.lab import cluster, cni, dns, netns, seed
from tracer.lab.cluster import ClusterSpec, Endpoint
from tracer.lab.dns import DigReply

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_SCRIPT = REPO_ROOT / "scripts" / "seed-lab.sh"
PREFIX = "htdns"
SCRIPT_ENV = {
    "SEED_LAB_NODE": "dns-node",
    "SEED_LAB_POD_A": "dns-poda",
    "SEED_LAB_POD_B": "dns-podb",
}
EXPORT = "100.67.30.133"  # what export.prod.svc.cluster.local resolves to
LIVE = [
    pytest.mark.needs_root,
    pytest.mark.needs_netns,
    pytest.mark.needs_binary("ip", "iptables-restore", "nft", "curl", "setsid", "dig", "dnsmasq"),
]
LabFactory = Callable[..., ClusterSpec]

# What dig 9.18 printed here, case by case (trimmed to the lines that matter).
DIG_ANSWER = """
; <<>> DiG 9.18.49-1~deb12u1-Debian <<>> @100.67.30.140 export.prod.svc.cluster.local +time=2 +tries=1
; (1 server found)
;; global options: +cmd
;; Got answer:
;; WARNING: .local is reserved for Multicast DNS
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 10414
;; flags: qr aa rd ra; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 1

;; QUESTION SECTION:
;export.prod.svc.cluster.local.	IN	A

;; ANSWER SECTION:
export.prod.svc.cluster.local. 0 IN	A	100.67.30.133

;; Query time: 0 msec
;; SERVER: 100.67.30.140#53(100.67.30.140) (UDP)
"""
DIG_NXDOMAIN = """;; Got answer:
;; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 1
;; flags: qr aa rd ra; QUERY: 1, ANSWER: 0, AUTHORITY: 0, ADDITIONAL: 1

;; QUESTION SECTION:
;nope.cluster.local.		IN	A

;; Query time: 0 msec
"""
DIG_UDP_TIMEOUT = """;; communications error to 100.67.30.140#53: timed out

; <<>> DiG 9.18.49-1~deb12u1-Debian <<>> @100.67.30.140 export.prod.svc.cluster.local
;; global options: +cmd
;; no servers could be reached
"""
DIG_TCP_TIMEOUT = (
    ";; Connection to 100.67.30.140#53(100.67.30.140) for export.prod.svc.cluster.local "
    "failed: timed out.\n;; no servers could be reached\n"
)
DIG_UDP_REFUSED = DIG_UDP_TIMEOUT.replace(": timed out", ": connection refused")
DIG_TCP_REFUSED = DIG_TCP_TIMEOUT.replace("timed out.", "connection refused.")
DIG_BIND_FAILED = (
    ";; UDP setup with 127.0.0.1#53(127.0.0.1) for x failed: address in use.\n"
    ";; no servers could be reached\n"
)


# ------------------------------------------------------------------ pure checks


@pytest.mark.parametrize(
    ("output", "want"),
    [
        (DIG_ANSWER, (True, "NOERROR", (EXPORT,), "")),
        (DIG_NXDOMAIN, (True, "NXDOMAIN", (), "")),
        (DIG_UDP_TIMEOUT, (False, "timeout", (), "communications error to 100.67.30.140#53: timed out")),
        (DIG_TCP_TIMEOUT, (False, "timeout", (), DIG_TCP_TIMEOUT.splitlines()[0][3:-1])),
        (DIG_UDP_REFUSED, (False, "connection-refused", (), DIG_UDP_REFUSED.splitlines()[0][3:])),
        (DIG_TCP_REFUSED, (False, "connection-refused", (), DIG_TCP_REFUSED.splitlines()[0][3:-1])),
        (DIG_BIND_FAILED, (False, "error", (), DIG_BIND_FAILED.splitlines()[0][3:-1])),
        ("", (False, "error", (), "no output")),
    ],
)  # fmt: skip
def test_dig_output_is_parsed(output: str, want: tuple[object, ...]) -> None:
    assert dns.parse_dig(output) == want


def test_only_the_answer_section_gives_addresses() -> None:
    extra = DIG_ANSWER + "\n;; ADDITIONAL SECTION:\nns.cluster.local. 0 IN A 10.0.0.9\n"
    assert dns.parse_dig(extra)[2] == (EXPORT,)
    two = DIG_ANSWER.replace(
        "IN\tA\t100.67.30.133\n", "IN\tA\t100.67.30.133\nexport.prod.svc.cluster.local. 0 IN A 1.2.3.4\n"
    )  # fmt: skip
    assert dns.parse_dig(two)[2] == (EXPORT, "1.2.3.4")


def test_dig_argv() -> None:
    assert dns.dig_argv("a.b", "100.67.30.140") == [
        "dig", "@100.67.30.140", "-p", "53", "+time=2", "+tries=1", "a.b"
    ]  # fmt: skip
    argv = dns.dig_argv("a.b", "10.0.0.1", port=5353, tcp=True, timeout=0.5, sport=12345)
    assert argv == ["dig", "@10.0.0.1", "-p", "5353", "+time=1", "+tries=1", "+tcp",
                    "-b", "0.0.0.0#12345", "a.b"]  # fmt: skip


def test_dnsmasq_serves_only_its_records_as_root(tmp_path: Path) -> None:
    argv = dns.dnsmasq_argv("100.96.54.247", tmp_path / "d.log")
    assert argv[0] == "dnsmasq" and "--keep-in-foreground" in argv
    for opt in ("--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--user=root", "--pid-file=",
                f"--log-facility={tmp_path / 'd.log'}", "--listen-address=100.96.54.247",
                "--port=53", "--host-record=export.prod.svc.cluster.local,100.67.30.133",
                "--host-record=kube-dns.kube-system.svc.cluster.local,100.67.30.140"):  # fmt: skip
        assert opt in argv, opt
    assert not [a for a in argv if a.startswith(("--server", "--address", "-S"))]


def test_dig_many_spreads_queries_and_pins_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int | None, bool]] = []

    def fake(ns: str, name: str, **kw: object) -> DigReply:
        sport = kw["sport"]
        assert isinstance(sport, int) and name == dns.DEFAULT_QUERY
        calls.append((ns, sport, bool(kw["tcp"])))
        return DigReply(True, (EXPORT,), "NOERROR", 0.01, sport, ns, bool(kw["tcp"]))

    monkeypatch.setattr(dns, "dig", fake)
    got = dns.dig_many(["a", "b", "c"], 7, tcp=True, sport_base=20000, parallel=3)
    assert [r.pod for r in got] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [r.sport for r in got] == list(range(20000, 20007))
    assert sorted(calls) == sorted((r.pod, r.sport, True) for r in got)
    ports = [r.sport for r in dns.dig_many(["a"], 50)]
    assert ports == list(range(ports[0], ports[0] + 50)) and 10000 <= ports[0] <= 32000 - 50
    with pytest.raises(UsageError, match="at least one client"):
        dns.dig_many([], 3)
    with pytest.raises(UsageError, match="1 to 22000 queries"):
        dns.dig_many(["a"], 0)


def _script_fn(body: str, env: dict[str, str] | None = None) -> str:
    """Run bash ``body`` with seed-lab.sh's functions loaded (its main not run)."""
    src = f'source <(sed "s/^main \\"\\$@\\"$//" {SEED_SCRIPT}); {body}'
    out = subprocess.run(["bash", "-c", src], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}, timeout=30)  # fmt: skip
    return out.stdout


@pytest.mark.parametrize(("self_call", "backend"), [("0", "100.96.54.247"), ("1", "100.96.54.240")])
def test_seed_script_rules_match_the_cluster_labs(self_call: str, backend: str) -> None:
    """Its bash kp_hash gives kube-proxy's chain names for both backends (SEED_LAB_SELF)."""
    nat = _script_fn("nat_rules", {"SEED_LAB_SELF": self_call}).splitlines()
    eps = (Endpoint(backend, 53),)
    spec = ClusterSpec(endpoints=(Endpoint(backend, 80),), dns_endpoints=eps)
    want = cluster.iptables_rules(spec).partition("*filter")[0].splitlines()
    assert nat == want


def test_seed_script_starts_dnsmasq_like_the_cluster_lab(tmp_path: Path) -> None:
    # setsid and in_ns stubbed: write what would run (to the log, where its output goes),
    # and "answer" the readiness dig
    _script_fn(f"STATE_DIR={tmp_path}; setsid() {{ printf '%s\\n' \"$@\"; }}; "
               "in_ns() { echo 100.67.30.133; }; start_dns")  # fmt: skip
    argv = (tmp_path / "dnsmasq.log").read_text().splitlines()
    i = argv.index("dnsmasq")
    assert argv[i - 4 : i] == ["ip", "netns", "exec", "podb"]
    assert argv[i:] == dns.dnsmasq_argv("100.96.54.247", tmp_path / "dnsmasq.log")


# ------------------------------------------------------------------ live: cluster lab


def _require_cni() -> None:
    if not os.access(Path(cni.DEFAULT_CNI_PATH) / "bridge", os.X_OK):
        pytest.skip(f"the cluster lab needs the CNI bridge plugin in {cni.DEFAULT_CNI_PATH}")


def _lab_namespaces() -> list[str]:
    return [ns for ns in netns.list_netns() if ns.startswith(PREFIX + "-")]


@pytest.fixture
def cluster_lab(request: pytest.FixtureRequest) -> LabFactory:
    """Build cluster labs of prefix htdns; a finalizer takes each down and checks nothing is left."""
    _require_cni()
    if _lab_namespaces() or ClusterSpec(prefix=PREFIX).state_file.exists():
        pytest.fail(f"a {PREFIX} cluster lab already exists; run: hairtrace lab down (prefix)")
    built: list[str] = []

    def teardown() -> None:
        for prefix in built:
            cluster.down(prefix)
        assert _lab_namespaces() == []

    request.addfinalizer(teardown)

    def build(**kw: object) -> ClusterSpec:
        spec = ClusterSpec(prefix=PREFIX, endpoints=cluster.default_endpoints(1), **kw)  # type: ignore[arg-type]
        built.append(PREFIX)
        cluster.up(spec)
        return spec

    return build


def _queries_logged(spec: ClusterSpec, pod_ns: str) -> int:
    log = spec.work_dir / f"{pod_ns}.dnsmasq.log"
    return log.read_text().count(f"query[A] {dns.DEFAULT_QUERY} from {spec.client.ip}")


def _set_knob(spec: ClusterSpec, value: int) -> None:
    node = spec.node_ns(1)
    netns.sysctl_write(node, seed.BRIDGE_NF_CALL_IPTABLES, value)
    assert netns.sysctl_read(node, seed.BRIDGE_NF_CALL_IPTABLES) == str(value)


class TestClusterDns:
    pytestmark = LIVE

    @pytest.mark.parametrize("mode", ["iptables", "nftables"])
    def test_udp_needs_bridge_nf_call_iptables(self, cluster_lab: LabFactory, mode: str) -> None:
        spec = cluster_lab(proxy_mode=mode)
        backend = spec.pods[1].ns
        for tcp in (False, True):
            got = cluster.dig(spec, tcp=tcp)
            assert (got.answered, got.status, got.addresses) == (True, "NOERROR", (EXPORT,)), got
        own = cluster.dig(spec, "kube-dns.kube-system.svc.cluster.local")
        assert own.addresses == (cluster.DNS_IP,)
        load = cluster.dig_load(spec, 12, sport_base=21000)
        assert [r.status for r in load] == ["NOERROR"] * 12
        assert [r.sport for r in load] == list(range(21000, 21012))

        _set_knob(spec, 0)  # the node netns only: the caller's stays as it was
        before = _queries_logged(spec, backend)
        got = cluster.dig(spec)
        assert (got.answered, got.status) == (False, "timeout"), got
        assert got.elapsed_s >= 1.9 and "timed out" in got.error
        # the query reached dnsmasq: the un-NATed reply is what got lost
        assert _queries_logged(spec, backend) == before + 1
        load = cluster.dig_load(spec, 6, timeout=1.0)
        assert [r.status for r in load] == ["timeout"] * 6
        assert cluster.curl(spec, timeout=2).ok is False  # TCP breaks the same way

        _set_knob(spec, 1)
        got = cluster.dig(spec)
        assert got.answered and got.addresses == (EXPORT,), got

    @pytest.mark.parametrize("mode", ["iptables", "nftables"])
    def test_no_endpoints_is_refused_fast(self, cluster_lab: LabFactory, mode: str) -> None:
        spec = cluster_lab(proxy_mode=mode, dns_endpoints=())
        assert spec.dns_pods == ()
        assert not any("dnsmasq" in " ".join(netns.pid_cmdline(pid))
                       for pid in netns.pids(spec.pods[1].ns))  # fmt: skip
        for tcp in (False, True):
            got = cluster.dig(spec, tcp=tcp)
            assert (got.answered, got.status) == (False, "connection-refused"), got
            assert got.elapsed_s < 1.0, got  # the ICMP port unreachable, not dig's 2 s timer
        assert cluster.curl(spec).ok  # prod/export keeps its endpoint


# ------------------------------------------------------------------ live: seed-lab.sh


@pytest.fixture
def dns_script() -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """scripts/seed-lab.sh with its own namespace names; ``down`` afterwards, whatever happens."""
    if any(netns.exists(ns) for ns in SCRIPT_ENV.values()):
        pytest.fail(f"namespaces {tuple(SCRIPT_ENV.values())} already exist; run seed-lab.sh down")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(SEED_SCRIPT), *args], capture_output=True, text=True,
                              env={**os.environ, **SCRIPT_ENV}, timeout=60, check=False)  # fmt: skip

    try:
        yield run
    finally:
        run("down")
        assert not any(netns.exists(ns) for ns in SCRIPT_ENV.values())


class TestSeedScriptDns:
    pytestmark = LIVE

    def test_dns_answers_with_1_and_times_out_with_0(
        self, dns_script: Callable[..., subprocess.CompletedProcess[str]]
    ) -> None:
        pod_a = SCRIPT_ENV["SEED_LAB_POD_A"]
        state = Path("/run/hairtrace/seed-lab-sh") / SCRIPT_ENV["SEED_LAB_NODE"]
        up = dns_script("up", "1")
        assert up.returncode == 0, up.stderr
        got = dns.dig(pod_a)
        assert (got.status, got.addresses) == ("NOERROR", (EXPORT,)), got
        assert dns.dig(pod_a, tcp=True).addresses == (EXPORT,)
        pid = int((state / "dnsmasq.pid").read_text())
        assert "dnsmasq" in netns.pid_cmdline(pid)
        assert (
            "query[A] export.prod.svc.cluster.local from 100.96.54.240"
            in (state / "dnsmasq.log").read_text()
        )
        down = dns_script("down")
        assert down.returncode == 0, down.stderr
        assert not netns.pid_alive(pid)

        up = dns_script("up", "0")
        assert up.returncode == 0, up.stderr
        got = dns.dig(pod_a)
        assert (got.answered, got.status) == (False, "timeout"), got
        assert got.elapsed_s >= 1.9
