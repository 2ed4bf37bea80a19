"""The seed lab: a one-node reproduction of the ClusterIP hairpin bug hairtrace exists to explain.

Pod A curls ClusterIP 100.67.30.133:80; kube-proxy-style NAT rules in the node
netns DNAT it to pod B 100.96.54.247:80 on the same bridge ``cni0``. With
``net.bridge.bridge-nf-call-iptables=0`` in the node netns, pod B's SYN+ACK is
bridged straight back to pod A without reverse NAT; pod A answers RST and curl
times out. With the sysctl at 1 the connection works.

Everything lives in network namespaces the lab creates (``ht-node``,
``ht-pod-a``, ``ht-pod-b`` by default); the caller's own netns, sysctls, rules
and links are never touched. Pods are wired by the real CNI reference
``bridge`` plugin configured the way flannel delegates to it. What was created
is recorded in a JSON state file under ``/run/hairtrace/lab/`` so that
:func:`down` works from another process.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from string import Template
from typing import Any

from tracer.errors import HairtraceError, UsageError
from tracer.lab import cni, netns

BRIDGE_NF_CALL_IPTABLES = "net.bridge.bridge-nf-call-iptables"
PROXY_MODES = ("iptables", "nftables")
STATE_VERSION = 1
_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _ip(text: str) -> ipaddress.IPv4Address:
    """Parse an IPv4 address, as a UsageError if it is not one."""
    try:
        return ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise UsageError(f"not an IPv4 address: {text!r}") from exc


@dataclass(frozen=True)
class SeedLab:
    """Names and addresses of one lab; the defaults are the seed bug report's."""

    node_ns: str = "ht-node"
    pod_a_ns: str = "ht-pod-a"
    pod_b_ns: str = "ht-pod-b"
    bridge: str = "cni0"
    bridge_ip: str = "100.96.54.1"
    pod_prefix_len: int = 24
    pod_a_ip: str = "100.96.54.240"
    pod_b_ip: str = "100.96.54.247"
    pod_b_port: int = 80
    service_ip: str = "100.67.30.133"
    service_port: int = 80
    service_namespace: str = "prod"
    service_name: str = "export"
    cluster_cidr: str = "100.96.0.0/11"
    cni_network: str = "cbr0"
    mtu: int = 1450
    cni_path: str = cni.DEFAULT_CNI_PATH
    state_root: str = "/run/hairtrace/lab"

    def __post_init__(self) -> None:
        """Reject names and addresses that cannot make a working lab."""
        for ns in self.namespaces:
            if not _NETNS_NAME.match(ns):
                raise UsageError(f"not a usable netns name: {ns!r}")
        if len(set(self.namespaces)) != 3:
            raise UsageError(f"lab namespaces must be distinct: {self.namespaces}")
        subnet = self.pod_subnet
        for label, ip in (
            ("bridge", self.bridge_ip),
            ("pod A", self.pod_a_ip),
            ("pod B", self.pod_b_ip),
        ):
            if _ip(ip) not in subnet:
                raise UsageError(f"{label} address {ip} is outside the pod subnet {subnet}")
        _ip(self.service_ip)
        try:
            ipaddress.IPv4Network(self.cluster_cidr)
        except ValueError as exc:
            raise UsageError(f"not an IPv4 CIDR: {self.cluster_cidr!r}") from exc

    @property
    def namespaces(self) -> tuple[str, str, str]:
        """The lab's network namespaces, node first."""
        return (self.node_ns, self.pod_a_ns, self.pod_b_ns)

    @property
    def pod_namespaces(self) -> tuple[str, str]:
        """The two pod namespaces (client A, server B)."""
        return (self.pod_a_ns, self.pod_b_ns)

    @property
    def pod_subnet(self) -> ipaddress.IPv4Network:
        """The node's pod subnet on the bridge, e.g. 100.96.54.0/24."""
        return ipaddress.IPv4Network(f"{self.bridge_ip}/{self.pod_prefix_len}", strict=False)

    @property
    def service_url(self) -> str:
        """The URL pod A fetches through the ClusterIP."""
        return f"http://{self.service_ip}:{self.service_port}/"

    @property
    def pod_b_url(self) -> str:
        """The URL of pod B's server, bypassing the Service."""
        return f"http://{self.pod_b_ip}:{self.pod_b_port}/"

    @property
    def endpoint(self) -> str:
        """The Service's one endpoint as kube-proxy writes it, "IP:port"."""
        return f"{self.pod_b_ip}:{self.pod_b_port}"

    @property
    def service_port_name(self) -> str:
        """kube-proxy's ServicePortName string for the (unnamed) port: "namespace/name"."""
        return f"{self.service_namespace}/{self.service_name}"

    @property
    def state_file(self) -> Path:
        """The JSON record of what :func:`up` created for this lab."""
        return Path(self.state_root) / f"{self.node_ns}.json"

    @property
    def cni_data_dir(self) -> Path:
        """host-local IPAM's lab-owned allocation directory."""
        return Path(self.state_root) / "cni" / self.node_ns

    @property
    def server_dir(self) -> Path:
        """Pod B's document root, server log and pid file."""
        return Path(self.state_root) / "srv" / self.node_ns

    def pod_ip(self, pod_ns: str) -> str:
        """The seed address of pod namespace ``pod_ns``."""
        return {self.pod_a_ns: self.pod_a_ip, self.pod_b_ns: self.pod_b_ip}[pod_ns]


SEED = SeedLab()


@dataclass(frozen=True)
class LabState:
    """What :func:`up` created, as recorded in the lab's state file."""

    lab: SeedLab
    proxy_mode: str
    bridge_nf_call_iptables: int
    created_netns: tuple[str, ...] = ()
    cni_attached: tuple[str, ...] = ()
    server_pid: int | None = None

    def to_json(self) -> str:
        """The state file's text."""
        data: dict[str, Any] = {"version": STATE_VERSION, **asdict(self)}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LabState:
        """Parse a state file's text; raise HairtraceError if it is not one."""
        try:
            data = json.loads(text)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            return cls(
                lab=SeedLab(**data["lab"]),
                proxy_mode=str(data["proxy_mode"]),
                bridge_nf_call_iptables=int(data["bridge_nf_call_iptables"]),
                created_netns=tuple(data["created_netns"]),
                cni_attached=tuple(data["cni_attached"]),
                server_pid=None if data["server_pid"] is None else int(data["server_pid"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HairtraceError(f"not a hairtrace lab state file: {exc}") from exc


@dataclass(frozen=True)
class LabStatus:
    """What exists of a lab right now, observed from the kernel and the state file."""

    namespaces: dict[str, bool]
    bridge_nf_call_iptables: int | None
    # The bridge's own nf_call_iptables option (ip link ... type bridge nf_call_iptables 1):
    # when 1 it sends bridged IPv4 through iptables whatever the sysctl says.
    bridge_option_nf_call_iptables: int | None
    server_pid: int | None
    server_alive: bool
    proxy_mode: str | None
    rules_present: bool
    state_file: str | None

    @property
    def is_up(self) -> bool:
        """Whether the whole lab is in place (namespaces, NAT rules, pod B's server)."""
        return all(self.namespaces.values()) and self.rules_present and self.server_alive

    @property
    def is_absent(self) -> bool:
        """Whether nothing of the lab is left."""
        return not any(self.namespaces.values()) and not self.server_alive and not self.state_file


@dataclass(frozen=True)
class Probe:
    """The outcome of one curl from pod A."""

    url: str
    ok: bool
    exit_code: int
    http_status: int | None
    error: str = field(default="")

    @property
    def timed_out(self) -> bool:
        """Whether curl gave up waiting (exit 28), the seed bug's symptom."""
        return self.exit_code == 28


# ---------------------------------------------------------------------------
# kube-proxy rule shapes


IPTABLES_TEMPLATE = Template("""\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:$svc_chain - [0:0]
:$sep_chain - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" \
-j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -d $service_ip/32 -p tcp -m comment --comment "$svc cluster IP" \
-m tcp --dport $service_port -j $svc_chain
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the \
last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A $svc_chain ! -s $cluster_cidr -d $service_ip/32 -p tcp -m comment --comment "$svc cluster IP" \
-m tcp --dport $service_port -j KUBE-MARK-MASQ
-A $svc_chain -m comment --comment "$svc -> $endpoint" -j $sep_chain
-A $sep_chain -s $pod_b_ip/32 -m comment --comment "$svc" -j KUBE-MARK-MASQ
-A $sep_chain -p tcp -m comment --comment "$svc" -m tcp -j DNAT --to-destination $endpoint
COMMIT
""")

NFTABLES_TEMPLATE = Template("""\
table ip kube-proxy {
\tcomment "rules for kube-proxy"

\tchain mark-for-masquerade {
\t\tmeta mark set meta mark | 0x4000
\t}

\tchain masquerading {
\t\tmeta mark & 0x4000 == 0 return
\t\tmeta mark set meta mark ^ 0x4000
\t\tmasquerade fully-random
\t}

\tchain $sep_chain {
\t\tip saddr $pod_b_ip jump mark-for-masquerade
\t\tmeta l4proto tcp dnat to $endpoint
\t}

\tchain $svc_chain {
\t\tip daddr $service_ip tcp dport $service_port ip saddr != $cluster_cidr \
jump mark-for-masquerade
\t\tnumgen random mod 1 vmap { 0 : goto $sep_chain }
\t}

\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\tcomment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
\t\telements = { $service_ip . tcp . $service_port : goto $svc_chain }
\t}

\tchain services {
\t\tip daddr . meta l4proto . th dport vmap @service-ips
\t}

\tchain nat-prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump services
\t}

\tchain nat-output {
\t\ttype nat hook output priority -100; policy accept;
\t\tjump services
\t}

\tchain nat-postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tjump masquerading
\t}
}
""")


def _b32_sha256(text: str) -> str:
    """base32(sha256(text)), the hash kube-proxy puts in chain names."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def iptables_chain_names(lab: SeedLab = SEED) -> tuple[str, str]:
    """kube-proxy's (KUBE-SVC-..., KUBE-SEP-...) chain names for the lab's Service."""
    base = lab.service_port_name + "tcp"
    svc = "KUBE-SVC-" + _b32_sha256(base)[:16]
    return (svc, "KUBE-SEP-" + _b32_sha256(base + lab.endpoint)[:16])


def nftables_chain_names(lab: SeedLab = SEED) -> tuple[str, str]:
    """kube-proxy's nftables (service-..., endpoint-...) chain names for the lab's Service."""
    # ServicePort base "namespace/name/protocol/portName"; the port is unnamed, so it ends in "/".
    svc_base = f"{lab.service_namespace}/{lab.service_name}/tcp/"
    sep_base = f"{svc_base}__{lab.pod_b_ip}/{lab.pod_b_port}"
    return (
        f"service-{_b32_sha256(svc_base)[:8]}-{svc_base}",
        f"endpoint-{_b32_sha256(sep_base)[:8]}-{sep_base}",
    )


def _template_values(lab: SeedLab, chains: tuple[str, str]) -> dict[str, Any]:
    """The substitutions shared by both rule templates."""
    return {
        "svc_chain": chains[0],
        "sep_chain": chains[1],
        "svc": lab.service_port_name,
        "service_ip": lab.service_ip,
        "service_port": lab.service_port,
        "cluster_cidr": lab.cluster_cidr,
        "pod_b_ip": lab.pod_b_ip,
        "endpoint": lab.endpoint,
    }


def iptables_rules(lab: SeedLab = SEED) -> str:
    """The nat table, in iptables-restore format, as kube-proxy's iptables mode writes it."""
    return IPTABLES_TEMPLATE.substitute(_template_values(lab, iptables_chain_names(lab)))


def nftables_rules(lab: SeedLab = SEED) -> str:
    """The ``ip kube-proxy`` table, in nft -f format, as kube-proxy's nftables mode writes it."""
    return NFTABLES_TEMPLATE.substitute(_template_values(lab, nftables_chain_names(lab)))


def cni_config(lab: SeedLab = SEED) -> dict[str, Any]:
    """The bridge-plugin network config, shaped like the one flannel delegates."""
    ipam: dict[str, Any] = {
        "type": "host-local",
        "subnet": str(lab.pod_subnet),
        "routes": [{"dst": lab.cluster_cidr}],
        "dataDir": str(lab.cni_data_dir),
    }
    if _ip(lab.bridge_ip) != next(lab.pod_subnet.hosts()):
        ipam["gateway"] = lab.bridge_ip
    return {
        "cniVersion": "0.3.1",
        "name": lab.cni_network,
        "type": "bridge",
        "bridge": lab.bridge,
        "isGateway": True,
        "isDefaultGateway": True,
        "ipMasq": False,
        "hairpinMode": True,
        "mtu": lab.mtu,
        "ipam": ipam,
    }


def cni_attachment(lab: SeedLab, pod_ns: str) -> cni.Attachment:
    """The CNI attachment of pod ``pod_ns``, asking host-local for the pod's seed address."""
    return cni.Attachment(
        container_id=f"hairtrace-{pod_ns}",
        netns_path=str(netns.NETNS_DIR / pod_ns),
        ifname="eth0",
        args={"IP": lab.pod_ip(pod_ns)},
    )


# ---------------------------------------------------------------------------
# small checks


def _require_root() -> None:
    """The lab creates namespaces and NAT rules, which needs root."""
    if os.geteuid() != 0:
        raise HairtraceError("the seed lab needs root (network namespaces, NAT rules)")


def _check_knob(value: int) -> int:
    """Validate a bridge-nf-call-iptables value (0 or 1)."""
    if isinstance(value, bool) or value not in (0, 1):
        raise UsageError(f"{BRIDGE_NF_CALL_IPTABLES} must be 0 or 1, not {value!r}")
    return int(value)


def _check_proxy_mode(mode: str) -> str:
    """Validate a kube-proxy mode name."""
    if mode not in PROXY_MODES:
        raise UsageError(f"proxy mode must be one of {', '.join(PROXY_MODES)}, not {mode!r}")
    return mode


def _require_bridge_nf_sysctl(lab: SeedLab) -> None:
    """Fail clearly if the knob the bug is about does not exist in the node netns."""
    if not netns.sysctl_exists(lab.node_ns, BRIDGE_NF_CALL_IPTABLES):
        raise HairtraceError(
            f"{BRIDGE_NF_CALL_IPTABLES} does not exist in netns {lab.node_ns} even with bridge "
            f"{lab.bridge} present: this kernel has no br_netfilter (load the module)"
        )


def _require_node(lab: SeedLab) -> None:
    """Fail clearly if there is no lab node netns to act on."""
    if not netns.exists(lab.node_ns):
        raise HairtraceError(f"no seed lab: netns {lab.node_ns} does not exist (run lab up)")


# ---------------------------------------------------------------------------
# state file


def temp_of(path: Path) -> Path:
    """Where write_state writes before renaming (removed by down if left behind)."""
    return path.with_suffix(".json.tmp")


def write_state(path: Path, text: str) -> None:
    """Write a lab state file atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_of(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _save(state: LabState) -> LabState:
    """Write the state file atomically; return the state for chaining."""
    write_state(state.lab.state_file, state.to_json())
    return state


def load_state(lab: SeedLab = SEED) -> LabState | None:
    """The recorded state of ``lab``, or None if it has no state file."""
    try:
        text = lab.state_file.read_text()
    except FileNotFoundError:
        return None
    return LabState.from_json(text)


# ---------------------------------------------------------------------------
# pod B's HTTP server


def _server_argv(lab: SeedLab) -> list[str]:
    """pod B's HTTP server command (run inside pod B's netns)."""
    return [
        sys.executable or "python3",
        "-m",
        "http.server",
        str(lab.pod_b_port),
        "--bind",
        lab.pod_b_ip,
        "--directory",
        str(lab.server_dir),
    ]


def _start_server(lab: SeedLab) -> int:
    """Start pod B's HTTP server detached (own session, reparented); return its pid."""
    lab.server_dir.mkdir(parents=True, exist_ok=True)
    (lab.server_dir / "index.html").write_text(f"hairtrace seed lab: pod B {lab.pod_b_ip}\n")
    pid_file = lab.server_dir / "server.pid"
    pid_file.unlink(missing_ok=True)
    # setsid -f forks so the server is not our child; the shell records its own pid,
    # which the server keeps because `sh` and `ip netns exec` both exec.
    argv = [
        "setsid",
        "-f",
        "sh",
        "-c",
        'echo $$ > "$0"; exec "$@"',
        str(pid_file),
        *netns.exec_argv(lab.pod_b_ns, _server_argv(lab)),
    ]
    with open(lab.server_dir / "server.log", "ab") as log:
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            check=True,
            cwd=lab.server_dir,
            timeout=10,
        )
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        if text.isdigit():
            return int(text)
        time.sleep(0.02)
    raise HairtraceError(f"pod B's HTTP server did not record its pid in {pid_file}")


def _is_lab_server(pid: int | None, lab: SeedLab) -> bool:
    """Whether ``pid`` is alive and is this lab's pod B HTTP server (guards against pid reuse)."""
    if pid is None or not netns.pid_alive(pid):
        return False
    argv = netns.pid_cmdline(pid)
    return "http.server" in argv and lab.pod_b_ip in argv


def _server_log_tail(lab: SeedLab) -> str:
    """The last line of pod B's server log, for error messages."""
    try:
        lines = (lab.server_dir / "server.log").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "no log"
    return lines[-1].strip() if lines else "empty log"


def _terminate(pid: int, grace: float = 2.0) -> None:
    """SIGTERM ``pid``, then SIGKILL if it is still alive after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not netns.pid_alive(pid):
                return
            time.sleep(0.02)
    raise HairtraceError(f"process {pid} survived SIGKILL")


# ---------------------------------------------------------------------------
# probes


def probe(lab: SeedLab = SEED, *, target: str = "service", timeout: float = 3.0) -> Probe:
    """curl from pod A to the Service ("service") or straight to pod B ("pod_b")."""
    urls = {"service": lab.service_url, "pod_b": lab.pod_b_url}
    if target not in urls:
        raise UsageError(f"probe target must be 'service' or 'pod_b', not {target!r}")
    url = urls[target]
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-m", f"{timeout:g}", url]
    proc = netns.run_in(lab.pod_a_ns, argv, timeout=timeout + 10, check=False)
    code = proc.stdout.strip()
    status = int(code) if code.isdigit() and code != "000" else None
    ok = proc.returncode == 0 and status is not None and 200 <= status < 400
    return Probe(url, ok, proc.returncode, status, proc.stderr.strip())


def wait_ready(lab: SeedLab = SEED, timeout: float = 5.0) -> None:
    """Wait until pod B's server answers pod A directly (not via the Service)."""
    state = load_state(lab)
    pid = state.server_pid if state else None
    deadline = time.monotonic() + timeout
    last = "not tried"
    while True:
        if pid is not None and not netns.pid_alive(pid):
            raise HairtraceError(f"pod B's HTTP server (pid {pid}) exited: {_server_log_tail(lab)}")
        result = probe(lab, target="pod_b", timeout=1.0)
        if result.ok:
            return
        last = result.error or f"exit {result.exit_code}"
        if time.monotonic() >= deadline:
            raise HairtraceError(
                f"pod B's server at {lab.pod_b_url} did not answer pod A within {timeout:g} s: "
                f"{last}"
            )
        time.sleep(0.1)


# ---------------------------------------------------------------------------
# up


def _refuse_existing(lab: SeedLab) -> None:
    """Fail if any part of a lab with these names already exists."""
    present = [ns for ns in lab.namespaces if netns.exists(ns)]
    if present:
        raise HairtraceError(
            f"a seed lab already exists (netns {', '.join(present)}); run lab down first"
        )
    if lab.state_file.exists():
        raise HairtraceError(f"a seed lab state file exists ({lab.state_file}); run lab down first")


def _clear_stale_dirs(lab: SeedLab) -> None:
    """Remove lab-owned leftovers that have no lab (no state file, no namespaces)."""
    for path in (lab.cni_data_dir, lab.server_dir):
        shutil.rmtree(path, ignore_errors=True)


def _attach_pod(lab: SeedLab, pod_ns: str) -> None:
    """CNI ADD pod ``pod_ns`` to the bridge and check it got its seed address."""
    result = cni.add(
        cni_config(lab),
        cni_attachment(lab, pod_ns),
        run_in_netns=lab.node_ns,
        cni_path=lab.cni_path,
    )
    want = f"{lab.pod_ip(pod_ns)}/{lab.pod_prefix_len}"
    got = cni.result_addresses(result)
    if want not in got:
        raise HairtraceError(f"CNI gave {pod_ns} {', '.join(got) or 'no address'}, not {want}")


def _load_rules(lab: SeedLab, proxy_mode: str) -> None:
    """Load the kube-proxy NAT rules of ``proxy_mode`` into the node netns."""
    if proxy_mode == "iptables":
        netns.run_in(lab.node_ns, ["iptables-restore", "-w", "5"], input_text=iptables_rules(lab))
    else:
        netns.run_in(lab.node_ns, ["nft", "-f", "/dev/stdin"], input_text=nftables_rules(lab))


def _set_knob(lab: SeedLab, value: int) -> None:
    """Write bridge-nf-call-iptables in the node netns and check it took."""
    _require_bridge_nf_sysctl(lab)
    netns.sysctl_write(lab.node_ns, BRIDGE_NF_CALL_IPTABLES, value)
    seen = netns.sysctl_read(lab.node_ns, BRIDGE_NF_CALL_IPTABLES)
    if seen != str(value):
        raise HairtraceError(
            f"{BRIDGE_NF_CALL_IPTABLES} in netns {lab.node_ns} reads {seen}, not {value}"
        )


def _build(state: LabState, ready_timeout: float) -> LabState:
    """Create the lab step by step, saving the state after each thing created."""
    lab = state.lab
    for ns in lab.namespaces:
        netns.add(ns)
        state = _save(replace(state, created_netns=(*state.created_netns, ns)))
    netns.sysctl_write(lab.node_ns, "net.ipv4.ip_forward", 1)
    lab.cni_data_dir.mkdir(parents=True, exist_ok=True)
    for pod_ns in lab.pod_namespaces:
        state = _save(replace(state, cni_attached=(*state.cni_attached, pod_ns)))
        _attach_pod(lab, pod_ns)
    _set_knob(lab, state.bridge_nf_call_iptables)
    _load_rules(lab, state.proxy_mode)
    state = _save(replace(state, server_pid=_start_server(lab)))
    wait_ready(lab, timeout=ready_timeout)
    return state


def up(
    lab: SeedLab = SEED,
    *,
    bridge_nf_call_iptables: int = 0,
    proxy_mode: str = "iptables",
    ready_timeout: float = 5.0,
) -> LabState:
    """Build the seed lab and wait until pod B answers pod A directly.

    Refuses (HairtraceError) if any part of a lab with these names exists. If
    building fails midway, whatever was created is torn down before the error
    is raised.
    """
    _require_root()
    knob = _check_knob(bridge_nf_call_iptables)
    _check_proxy_mode(proxy_mode)
    _refuse_existing(lab)
    _clear_stale_dirs(lab)
    state = _save(LabState(lab=lab, proxy_mode=proxy_mode, bridge_nf_call_iptables=knob))
    try:
        return _build(state, ready_timeout)
    except HairtraceError as exc:
        try:
            down(lab)
        except HairtraceError as cleanup:
            raise HairtraceError(f"{exc}; cleanup also failed: {cleanup}") from exc
        raise
    except BaseException:
        with contextlib.suppress(HairtraceError):
            down(lab)
        raise


# ---------------------------------------------------------------------------
# down


def _stop_processes(lab: SeedLab, state: LabState | None) -> list[str]:
    """Stop pod B's server and anything the lab left running inside the pod namespaces.

    Processes merely visiting the node netns (a tracer that setns()ed there) are
    left alone, and so are this process and its parent.
    """
    done: list[str] = []
    pid = state.server_pid if state else None
    if pid is not None and _is_lab_server(pid, lab):
        _terminate(pid)
        done.append(f"stopped HTTP server pid {pid}")
    spared = {os.getpid(), os.getppid()}
    for ns in lab.pod_namespaces:
        for stray in netns.pids(ns):
            if stray in spared or not netns.pid_alive(stray):
                continue
            _terminate(stray, grace=0.5)
            done.append(f"stopped pid {stray} in netns {ns}")
    return done


def _cni_del(lab: SeedLab, state: LabState | None) -> list[str]:
    """CNI DEL every pod the lab attached (needs the node netns, where the plugin runs)."""
    if not netns.exists(lab.node_ns):
        return []
    pods = state.cni_attached if state else lab.pod_namespaces
    done = []
    for pod_ns in pods:
        cni.delete(
            cni_config(lab),
            cni_attachment(lab, pod_ns),
            run_in_netns=lab.node_ns,
            cni_path=lab.cni_path,
        )
        done.append(f"CNI DEL {pod_ns}")
    return done


def _delete_namespaces(lab: SeedLab, state: LabState | None) -> list[str]:
    """Delete the pod namespaces, then the node namespace (its bridge and rules go with it)."""
    names = [lab.pod_a_ns, lab.pod_b_ns, lab.node_ns]
    names += [ns for ns in (state.created_netns if state else ()) if ns not in names]
    return [f"deleted netns {ns}" for ns in names if netns.delete(ns)]


def _remove_files(lab: SeedLab) -> list[str]:
    """Remove the lab's state file, IPAM data and server directory."""
    done = []
    for path in (lab.cni_data_dir, lab.server_dir):
        if path.exists():
            shutil.rmtree(path)
            done.append(f"removed {path}")
    for path in (lab.state_file, temp_of(lab.state_file)):
        if path.exists():
            path.unlink()
            done.append(f"removed {path}")
    return done


def down(lab: SeedLab = SEED) -> list[str]:
    """Remove everything :func:`up` created; return what was done ([] if nothing existed).

    Every step is attempted even if an earlier one fails; if anything is left
    behind, HairtraceError names each failed step.
    """
    _require_root()
    problems: list[str] = []
    try:
        state = load_state(lab)
    except HairtraceError as exc:
        state = None
        problems.append(f"state file {lab.state_file}: {exc}")
    done: list[str] = []
    steps = (
        ("stop processes", lambda: _stop_processes(lab, state)),
        ("CNI DEL", lambda: _cni_del(lab, state)),
        ("delete namespaces", lambda: _delete_namespaces(lab, state)),
        ("remove files", lambda: _remove_files(lab)),
    )
    for name, step in steps:
        try:
            done += step()
        except (HairtraceError, OSError) as exc:
            problems.append(f"{name}: {exc}")
    left = [ns for ns in lab.namespaces if netns.exists(ns)]
    if left:
        problems.append(f"netns still present: {', '.join(left)}")
    if problems:
        raise HairtraceError("seed lab teardown incomplete: " + "; ".join(problems))
    return done


# ---------------------------------------------------------------------------
# status and the fix knob


def _detect_rules(lab: SeedLab) -> str | None:
    """Which kube-proxy rule set for the lab's Service is loaded in the node netns, if any."""
    saved = netns.run_in(lab.node_ns, ["iptables-save", "-t", "nat"], check=False).stdout
    if f"-d {lab.service_ip}/32" in saved and f"--to-destination {lab.endpoint}" in saved:
        return "iptables"
    table = netns.run_in(lab.node_ns, ["nft", "list", "table", "ip", "kube-proxy"], check=False)
    if table.returncode == 0 and f"dnat to {lab.endpoint}" in table.stdout:
        return "nftables"
    return None


def _bridge_option_nf_call_iptables(lab: SeedLab) -> int | None:
    """The lab bridge's per-bridge nf_call_iptables option, or None if there is no bridge."""
    proc = netns.run_in(
        lab.node_ns, ["ip", "-d", "-j", "link", "show", "dev", lab.bridge], check=False
    )
    if proc.returncode != 0:
        return None
    try:
        info = json.loads(proc.stdout)[0]["linkinfo"]["info_data"]
        return int(info["nf_call_iptables"])
    except (ValueError, LookupError, TypeError):
        return None


def status(lab: SeedLab = SEED) -> LabStatus:
    """Observe what exists of ``lab``: namespaces, the knob, pod B's server, the NAT rules."""
    _require_root()
    namespaces = {ns: netns.exists(ns) for ns in lab.namespaces}
    knob: int | None = None
    option: int | None = None
    mode: str | None = None
    if namespaces[lab.node_ns]:
        if netns.sysctl_exists(lab.node_ns, BRIDGE_NF_CALL_IPTABLES):
            knob = int(netns.sysctl_read(lab.node_ns, BRIDGE_NF_CALL_IPTABLES))
        option = _bridge_option_nf_call_iptables(lab)
        mode = _detect_rules(lab)
    try:
        state = load_state(lab)
    except HairtraceError:
        state = None
    pid = state.server_pid if state else None
    return LabStatus(
        namespaces=namespaces,
        bridge_nf_call_iptables=knob,
        bridge_option_nf_call_iptables=option,
        server_pid=pid,
        server_alive=_is_lab_server(pid, lab),
        proxy_mode=mode,
        rules_present=mode is not None,
        state_file=str(lab.state_file) if lab.state_file.exists() else None,
    )


def set_bridge_nf_call_iptables(value: int, lab: SeedLab = SEED) -> None:
    """Set the fix knob in the lab's node netns only (1 = bridged IPv4 goes through iptables)."""
    _require_root()
    knob = _check_knob(value)
    _require_node(lab)
    _set_knob(lab, knob)
    try:
        state = load_state(lab)
    except HairtraceError:
        state = None
    if state is not None:
        _save(replace(state, bridge_nf_call_iptables=knob))
