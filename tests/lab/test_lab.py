"""The seed lab reproduces the ClusterIP bug, the knob fixes it, and teardown leaves nothing.

The live tests build real network namespaces, so they need root; every lab a
test builds is torn down by a fixture finalizer, whether the test passes or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tracer.errors import HairtraceError, UsageError
from tracer.lab import cni, netns, seed

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_SCRIPT = REPO_ROOT / "scripts" / "seed-lab.sh"
# The seed's names are left to whoever runs the lab by hand (or other test suites) at the
# same time: the tests build the same addresses in their own namespaces, which is safe
# because namespaces are isolated from one another.
LAB = seed.SeedLab(node_ns="ht-test-node", pod_a_ns="ht-test-pod-a", pod_b_ns="ht-test-pod-b")
SCRIPT_ENV = {"SEED_LAB_NODE": "t-node", "SEED_LAB_POD_A": "t-poda", "SEED_LAB_POD_B": "t-podb"}
SCRIPT_NAMESPACES = tuple(SCRIPT_ENV.values())
CURL_TIMEOUT = 3
LabFactory = Callable[..., seed.LabState]
ScriptRunner = Callable[..., subprocess.CompletedProcess[str]]

# What the live tests need (tests/conftest.py skips locally / fails under CI=true without it).
LIVE = [
    pytest.mark.needs_root,
    pytest.mark.needs_netns,
    pytest.mark.needs_binary("ip", "iptables-restore", "nft", "curl", "setsid"),
]


def require_lab_host() -> None:
    """Skip (with the reason) unless this machine can build the lab."""
    if os.geteuid() != 0:
        pytest.skip("the seed lab needs root (network namespaces, NAT rules)")
    if not os.access(Path(LAB.cni_path) / "bridge", os.X_OK):
        pytest.skip(f"the seed lab needs the CNI bridge plugin in {LAB.cni_path}")


def curl_from(ns: str, url: str) -> subprocess.CompletedProcess[str]:
    """``ip netns exec NS curl -m 3 URL``, exactly as an operator would type it."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, "curl", "-sS", "-m", str(CURL_TIMEOUT), url],
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT + 10,
        check=False,
    )


def tcp_out_rsts(ns: str) -> int:
    """The TCP OutRsts counter of netns ``ns`` (from its /proc/net/snmp)."""
    text = netns.run_in(ns, ["cat", "/proc/net/snmp"]).stdout
    header, values = [line.split() for line in text.splitlines() if line.startswith("Tcp:")][:2]
    return int(values[header.index("OutRsts")])


def lab_namespaces_left() -> list[str]:
    """Named network namespaces the tests' labs use (prefix ht-test-)."""
    return [ns for ns in netns.list_netns() if ns.startswith("ht-test-")]


def assert_service_broken(lab: seed.SeedLab = LAB) -> None:
    """Pod A reaches pod B directly, but the ClusterIP times out while pod A sends RSTs."""
    direct = curl_from(lab.pod_a_ns, lab.pod_b_url)
    assert direct.returncode == 0, direct.stderr
    rsts_before = tcp_out_rsts(lab.pod_a_ns)
    via_service = curl_from(lab.pod_a_ns, lab.service_url)
    assert via_service.returncode == 28, (via_service.returncode, via_service.stderr)
    assert tcp_out_rsts(lab.pod_a_ns) > rsts_before, "pod A should answer the SYN+ACK with RST"


def assert_service_works(lab: seed.SeedLab = LAB) -> None:
    """Pod A gets pod B's page through the ClusterIP."""
    via_service = curl_from(lab.pod_a_ns, lab.service_url)
    assert via_service.returncode == 0, via_service.stderr
    assert f"pod B {lab.pod_b_ip}" in via_service.stdout


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> LabFactory:
    """Build the seed lab with seed.up(**kwargs); a finalizer tears down every lab it built.

    A lab that seed.up refused to build (e.g. one already existed) is not ours
    and is left alone; a half-built one is cleaned by seed.up itself.
    """
    require_lab_host()
    built: list[seed.SeedLab] = []

    def teardown() -> None:
        for lab in built:
            seed.down(lab)

    request.addfinalizer(teardown)

    def build(**kwargs: object) -> seed.LabState:
        state = seed.up(LAB, **kwargs)  # type: ignore[arg-type]
        built.append(state.lab)
        return state

    return build


@pytest.fixture
def seed_script(request: pytest.FixtureRequest) -> ScriptRunner:
    """Run scripts/seed-lab.sh; a finalizer runs its ``down`` whatever the test's outcome."""
    require_lab_host()
    if any(netns.exists(ns) for ns in SCRIPT_NAMESPACES):
        pytest.fail(f"namespaces {SCRIPT_NAMESPACES} already exist; run seed-lab.sh down")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SEED_SCRIPT), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **SCRIPT_ENV},
            timeout=60,
            check=False,
        )

    request.addfinalizer(lambda: run("down"))
    return run


# ------------------------------------------------------------------ pure checks


def test_iptables_rules_have_kube_proxy_shape() -> None:
    rules = seed.iptables_rules()
    svc, sep = seed.iptables_chain_names()
    assert (svc, sep) == ("KUBE-SVC-QM5PIMX6ZJ6FY244", "KUBE-SEP-6G6CDX4OM4CT72BU")
    assert (
        f'-A KUBE-SERVICES -d 100.67.30.133/32 -p tcp -m comment --comment "prod/export cluster IP"'
        f" -m tcp --dport 80 -j {svc}"
    ) in rules
    assert f"-A {svc} ! -s 100.96.0.0/11 " in rules
    assert f"-A {sep} -s 100.96.54.247/32 " in rules
    assert "-j DNAT --to-destination 100.96.54.247:80" in rules
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000" in rules
    assert "-j MASQUERADE --random-fully" in rules
    for hook, chain in (
        ("PREROUTING", "KUBE-SERVICES"),
        ("OUTPUT", "KUBE-SERVICES"),
        ("POSTROUTING", "KUBE-POSTROUTING"),
    ):
        assert f"-A {hook} " in rules and f"-j {chain}\n" in rules


def test_chain_hash_matches_kube_proxy() -> None:
    # kube-proxy names default/kubernetes:https's chain KUBE-SVC-NPX46M4PTMTKRN6Y on every cluster.
    lab = seed.SeedLab(service_namespace="default", service_name="kubernetes:https")
    assert seed.iptables_chain_names(lab)[0] == "KUBE-SVC-NPX46M4PTMTKRN6Y"


def test_nftables_rules_have_kube_proxy_shape() -> None:
    rules = seed.nftables_rules()
    svc, sep = seed.nftables_chain_names()
    assert svc.startswith("service-") and svc.endswith("-prod/export/tcp/")
    assert sep.startswith("endpoint-") and sep.endswith("-prod/export/tcp/__100.96.54.247/80")
    assert "table ip kube-proxy {" in rules
    assert f"100.67.30.133 . tcp . 80 : goto {svc}" in rules
    assert "dnat to 100.96.54.247:80" in rules
    assert "masquerade fully-random" in rules


def test_cni_config_is_flannels_delegate() -> None:
    conf = seed.cni_config()
    assert conf["type"] == "bridge" and conf["bridge"] == "cni0"
    assert conf["isGateway"] and conf["isDefaultGateway"] and conf["hairpinMode"]
    assert conf["ipMasq"] is False
    assert conf["ipam"]["subnet"] == "100.96.54.0/24"
    assert conf["ipam"]["routes"] == [{"dst": "100.96.0.0/11"}]
    assert conf["ipam"]["dataDir"].startswith("/run/hairtrace/lab/cni/")


def test_cni_args_ask_host_local_for_an_ip() -> None:
    # The bridge plugin rejects CNI_ARGS keys it does not know unless IgnoreUnknown=1.
    assert cni.cni_args({"IP": "100.96.54.240"}) == "IgnoreUnknown=1;IP=100.96.54.240"
    assert cni.cni_args({}) == ""


def test_missing_bridge_nf_sysctl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "sysctl_exists", lambda ns, key: False)
    with pytest.raises(HairtraceError, match="bridge-nf-call-iptables does not exist in netns"):
        seed._require_bridge_nf_sysctl(LAB)


def test_bad_lab_values_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="outside the pod subnet"):
        seed.SeedLab(pod_a_ip="10.0.0.1")
    with pytest.raises(UsageError, match="netns name"):
        seed.SeedLab(node_ns="bad/name")


# ------------------------------------------------------------------ live lab


class TestPythonLab:
    """The lab built by tracer.lab.seed."""

    pytestmark = LIVE

    def test_knob_0_service_times_out_but_pod_b_answers(self, lab_factory: LabFactory) -> None:
        state = lab_factory(bridge_nf_call_iptables=0)
        status = seed.status(LAB)
        assert status.is_up
        assert status.bridge_nf_call_iptables == 0
        assert status.bridge_option_nf_call_iptables == 0
        assert status.proxy_mode == "iptables"
        assert status.server_pid == state.server_pid
        assert_service_broken()

    def test_knob_1_service_works(self, lab_factory: LabFactory) -> None:
        lab_factory(bridge_nf_call_iptables=1)
        assert seed.status(LAB).bridge_nf_call_iptables == 1
        assert_service_works()

    def test_setting_the_knob_fixes_a_broken_lab(self, lab_factory: LabFactory) -> None:
        lab_factory(bridge_nf_call_iptables=0)
        assert not seed.probe(LAB, target="service", timeout=CURL_TIMEOUT).ok
        seed.set_bridge_nf_call_iptables(1, LAB)
        assert seed.status(LAB).bridge_nf_call_iptables == 1
        recorded = seed.load_state(LAB)
        assert recorded is not None and recorded.bridge_nf_call_iptables == 1
        assert_service_works()

    def test_nftables_mode_breaks_and_heals_the_same_way(self, lab_factory: LabFactory) -> None:
        lab_factory(bridge_nf_call_iptables=0, proxy_mode="nftables")
        status = seed.status(LAB)
        assert status.is_up and status.proxy_mode == "nftables"
        assert_service_broken()
        seed.set_bridge_nf_call_iptables(1, LAB)
        assert_service_works()

    def test_pods_have_the_seed_addresses_from_cni(self, lab_factory: LabFactory) -> None:
        lab_factory()
        for pod_ns, ip in ((LAB.pod_a_ns, LAB.pod_a_ip), (LAB.pod_b_ns, LAB.pod_b_ip)):
            addrs = netns.run_in(pod_ns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
            assert f"inet {ip}/24" in addrs
        bridge = netns.run_in(LAB.node_ns, ["ip", "-4", "-o", "addr", "show", "dev", "cni0"]).stdout
        assert "inet 100.96.54.1/24" in bridge
        ports = netns.run_in(LAB.node_ns, ["bridge", "-d", "link", "show"]).stdout
        assert ports.count("master cni0") == 2 and ports.count("hairpin on") == 2

    def test_down_removes_everything_and_is_repeatable(self, lab_factory: LabFactory) -> None:
        host_knob = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text()
        host_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
        state = lab_factory(bridge_nf_call_iptables=1)
        assert state.server_pid is not None
        done = seed.down(LAB)
        assert f"stopped HTTP server pid {state.server_pid}" in done
        assert lab_namespaces_left() == []
        assert not netns.pid_alive(state.server_pid)
        assert not LAB.state_file.exists() and not LAB.cni_data_dir.exists()
        assert seed.status(LAB).is_absent
        assert seed.down(LAB) == []
        # the caller's own netns was never touched
        assert Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text() == host_knob
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forward
        assert not Path("/sys/class/net/cni0").exists()

    def test_a_failed_test_still_leaves_nothing_behind(self, tmp_path: Path) -> None:
        require_lab_host()
        pid_file = tmp_path / "server.pid"
        (tmp_path / "test_inner.py").write_text(
            textwrap.dedent(f"""\
            import sys
            sys.path.insert(0, {str(REPO_ROOT)!r})
            from tests.lab.test_lab import lab_factory  # the fixture under test

            def test_fails_with_a_lab_up(lab_factory):
                state = lab_factory(bridge_nf_call_iptables=0)
                open({str(pid_file)!r}, "w").write(str(state.server_pid))
                assert False, "deliberate failure"
            """)
        )
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
        inner = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--rootdir",
                str(tmp_path),
                str(tmp_path / "test_inner.py"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
            check=False,
        )
        assert "1 failed" in inner.stdout, inner.stdout + inner.stderr
        assert "deliberate failure" in inner.stdout
        assert lab_namespaces_left() == []
        assert not netns.pid_alive(int(pid_file.read_text()))
        assert not LAB.state_file.exists()

    def test_up_refuses_an_existing_lab(self, lab_factory: LabFactory) -> None:
        lab_factory()
        with pytest.raises(HairtraceError, match="already exists"):
            seed.up(LAB)
        assert seed.status(LAB).is_up

    def test_bad_arguments_and_missing_lab(self) -> None:
        require_lab_host()
        with pytest.raises(UsageError, match="0 or 1"):
            seed.up(LAB, bridge_nf_call_iptables=2)
        with pytest.raises(UsageError, match="proxy mode"):
            seed.up(LAB, proxy_mode="ipvs")
        if not netns.exists(LAB.node_ns):
            with pytest.raises(HairtraceError, match="no seed lab"):
                seed.set_bridge_nf_call_iptables(1, LAB)

    def test_cni_errors_carry_the_plugins_message(self, request: pytest.FixtureRequest) -> None:
        require_lab_host()
        ns = "ht-test-cni-error"
        netns.add(ns)
        request.addfinalizer(lambda: netns.delete(ns))
        attachment = cni.Attachment("hairtrace-cni-error", "/run/netns/ht-no-such-netns")
        expected = r"CNI bridge ADD for hairtrace-cni-error failed: .*ht-no-such-netns.*\(code"
        with pytest.raises(HairtraceError, match=expected):
            cni.add(seed.cni_config(LAB), attachment, run_in_netns=ns)


# ------------------------------------------------------------------ the shell script


class TestSeedScript:
    """The same topology built by scripts/seed-lab.sh, without tracer.lab."""

    pytestmark = LIVE

    def test_script_knob_0_reproduces_and_down_cleans(self, seed_script: ScriptRunner) -> None:
        up = seed_script("up", "0")
        assert up.returncode == 0, up.stderr
        assert curl_from(SCRIPT_ENV["SEED_LAB_POD_A"], "http://100.96.54.247/").returncode == 0
        assert curl_from(SCRIPT_ENV["SEED_LAB_POD_A"], "http://100.67.30.133/").returncode == 28
        down = seed_script("down")
        assert down.returncode == 0, down.stderr
        assert not any(netns.exists(ns) for ns in SCRIPT_NAMESPACES)
        assert seed_script("down").returncode == 0

    def test_script_knob_1_works(self, seed_script: ScriptRunner) -> None:
        up = seed_script("up", "1")
        assert up.returncode == 0, up.stderr
        works = curl_from(SCRIPT_ENV["SEED_LAB_POD_A"], "http://100.67.30.133/")
        assert works.returncode == 0 and "pod B 100.96.54.247" in works.stdout
        assert seed_script("up", "1").returncode != 0  # refuses to build over itself


def test_lab_load_failures_are_all_listed_with_their_reason() -> None:
    """Issue 17.8: every failure, with a reason and its local port when it has one."""
    from tracer.cli_lab import failure_lines

    failed = [
        {"sport": 40000 + i, "status": None, "backend": None,
         "error": "connect: timed out after 1 s"} for i in range(18)
    ] + [
        {"sport": None, "status": None, "backend": None, "error": "connect: Connection refused"},
        {"sport": 41000, "status": 503, "backend": None, "error": None},
    ]  # fmt: skip
    lines = failure_lines(failed)
    assert lines[0] == (
        "20 failed: 18 connect: timed out after 1 s; 1 connect: Connection refused; "
        "1 HTTP status 503"
    )
    assert len(lines) == 21
    assert lines[1] == "failed (local port 40000): connect: timed out after 1 s"
    assert "failed (local port unknown): connect: Connection refused" in lines
    assert "failed (local port 41000): HTTP status 503" in lines
    assert failure_lines([]) == []


@pytest.mark.live
def test_lab_load_names_the_reason_of_every_failure() -> None:
    """On the broken seed case every connection times out: 20 lines, each with its port."""
    from conftest import needs_live  # here: the inner pytest of a test below lacks conftest

    needs_live()
    hairtrace = [sys.executable, "-m", "tracer.cli"]
    subprocess.run([*hairtrace, "lab", "down"], check=False, capture_output=True, timeout=120)
    up = subprocess.run([*hairtrace, "lab", "up", "--fault", "bridge-nf-off"],
                        check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert up.returncode == 0, up.stderr
    try:
        res = subprocess.run([*hairtrace, "lab", "load", "-n", "20", "--timeout", "1"],
                             check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        subprocess.run([*hairtrace, "lab", "down"], check=False, capture_output=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    failed = [ln for ln in lines if ln.startswith("failed (")]
    # the backend on the client's own bridge fails; the others (none here) would succeed
    assert len(failed) == int(lines[0].split("/")[1].split()[0]) - int(lines[0].split("/")[0])
    assert failed, lines
    for ln in failed:
        assert ln.startswith("failed (local port ") and "port unknown" not in ln, ln
        assert ln.endswith("connect: timed out after 1 s") or "request: " in ln, ln
