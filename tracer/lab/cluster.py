"""The cluster lab: one or two nodes, pods on CNI bridges, flannel-style VXLAN, kube-proxy rules.

Healthy by default; a fault (tracer.lab.faults) is one small change on top. Node
``{p}-n1`` holds pods ``{p}-n1-a`` (the client, 100.96.54.240) and ``{p}-n1-b``
(100.96.54.247); with two nodes, ``{p}-n2`` holds ``{p}-n2-c`` and ``{p}-n2-d``
(100.96.55.10/.11). Nodes share an underlay (``eth0``, 192.168.77.0/24; a dummy on
one node) and reach each other's pod subnet over ``flannel.1`` (VXLAN VNI 1, port
8472, static FDB and neighbour entries, as flanneld programs them). Every pod serves
HTTP on port 80 naming itself (server.py). ClusterIP 100.67.30.133:80 has the
endpoints the variant asks for, written as kube-proxy writes them: nat and filter
tables through ``iptables-restore`` (statistic rules for several endpoints, the
filter REJECT for none) or the ``ip kube-proxy`` nft table. A second Service,
kube-system/kube-dns (100.67.30.140, 53/udp and 53/tcp), has pod ``{p}-n1-b`` as its
endpoint by default, where dnsmasq answers (dns.py).

Only namespaces the lab creates are touched; a JSON state file under
``/run/hairtrace/lab/`` lets ``down`` work from another process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tracer.errors import HairtraceError, UsageError
from tracer.lab import cni, dns, netns, seed
from tracer.lab.dns import DNS_IP, DNS_NAME, DNS_PORT, DigReply

SERVICE_IP, SERVICE_PORT = "100.67.30.133", 80
CLUSTER_CIDR = "100.96.0.0/11"
SVC_NAME = "prod/export"
UNDERLAY = "192.168.77.{}"
VXLAN_PORT, VXLAN_VNI = 8472, 1
STATE_ROOT = Path("/run/hairtrace/lab")
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Pod:
    ns: str
    node: int  # 1 or 2
    ip: str


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class ClusterSpec:
    """What to build: how many nodes, the Service's endpoints, the rule shape, the fault."""

    prefix: str = "ht"
    nodes: int = 1
    endpoints: tuple[Endpoint, ...] = ()
    proxy_mode: str = "iptables"
    fault: str = "none"
    # kube-proxy's KUBE-SEP "-s podIP -j KUBE-MARK-MASQ" (hairpin masquerade)
    hairpin_masquerade: bool = True
    bridge_nf_call_iptables: int = 1
    # the port kube-proxy's rules give the Service; clients call SERVICE_PORT
    service_port: int = SERVICE_PORT
    # kube-dns's endpoints: None = pod n1-b:53; () = none (kube-proxy's REJECT)
    dns_endpoints: tuple[Endpoint, ...] | None = None

    def __post_init__(self) -> None:
        if self.nodes not in (1, 2):
            raise UsageError(f"the cluster lab has 1 or 2 nodes, not {self.nodes}")
        if self.proxy_mode not in seed.PROXY_MODES:
            raise UsageError(f"proxy mode must be iptables or nftables, not {self.proxy_mode!r}")
        if not seed._NETNS_NAME.match(self.prefix + "-n1-a"):
            raise UsageError(f"not a usable lab prefix: {self.prefix!r}")

    def node_ns(self, n: int) -> str:
        return f"{self.prefix}-n{n}"

    @property
    def pods(self) -> tuple[Pod, ...]:
        p = self.prefix
        pods = [Pod(f"{p}-n1-a", 1, "100.96.54.240"), Pod(f"{p}-n1-b", 1, "100.96.54.247")]
        if self.nodes == 2:
            pods += [Pod(f"{p}-n2-c", 2, "100.96.55.10"), Pod(f"{p}-n2-d", 2, "100.96.55.11")]
        return tuple(pods)

    @property
    def client(self) -> Pod:
        return self.pods[0]

    @property
    def namespaces(self) -> tuple[str, ...]:
        nodes = tuple(self.node_ns(n) for n in range(1, self.nodes + 1))
        return nodes + tuple(p.ns for p in self.pods)

    @property
    def state_file(self) -> Path:
        return STATE_ROOT / f"cluster-{self.prefix}.json"

    @property
    def work_dir(self) -> Path:
        return STATE_ROOT / f"cluster-{self.prefix}"

    @property
    def service_url(self) -> str:
        return f"http://{SERVICE_IP}:{SERVICE_PORT}/"

    @property
    def dns_backends(self) -> tuple[Endpoint, ...]:
        """kube-dns's endpoints, the default (pod n1-b:53) filled in."""
        if self.dns_endpoints is None:
            return (Endpoint(self.pods[1].ip, DNS_PORT),)
        return self.dns_endpoints

    @property
    def dns_pods(self) -> tuple[Pod, ...]:
        """The pods that are kube-dns endpoints: they run dnsmasq."""
        ips = {e.ip for e in self.dns_backends}
        return tuple(p for p in self.pods if p.ip in ips)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["endpoints"] = [str(e) for e in self.endpoints]
        if self.dns_endpoints is not None:
            d["dns_endpoints"] = [str(e) for e in self.dns_endpoints]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterSpec:
        dns_eps = d.get("dns_endpoints")
        return cls(**{
            **d,
            "endpoints": _endpoints(d["endpoints"]),
            "dns_endpoints": None if dns_eps is None else _endpoints(dns_eps),
        })  # fmt: skip


def _endpoints(texts: list[str]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(e.rsplit(":", 1)[0], int(e.rsplit(":", 1)[1])) for e in texts)


def default_endpoints(nodes: int) -> tuple[Endpoint, ...]:
    """Pod B alone on one node; B, C and D (spread over both nodes) on two."""
    ips = ["100.96.54.247"] + (["100.96.55.10", "100.96.55.11"] if nodes == 2 else [])
    return tuple(Endpoint(ip, 80) for ip in ips)


def pod_subnet(node: int) -> str:
    return f"100.96.{53 + node}.0/24"


def _gateway(node: int) -> str:
    return f"100.96.{53 + node}.1"


def _vtep_mac(node: int) -> str:
    return f"02:68:74:00:00:{node:02x}"


# ---------------------------------------------------------------------------
# kube-proxy rules


@dataclass(frozen=True)
class ServicePort:
    """One Service port as kube-proxy keys its rules: namespace/name:port, protocol."""

    service: str  # namespace/name
    port_name: str  # "" for an unnamed port
    protocol: str  # tcp or udp
    ip: str
    port: int
    endpoints: tuple[Endpoint, ...]

    @property
    def label(self) -> str:
        """ServicePortName.String(): what kube-proxy hashes and writes in comments."""
        return f"{self.service}:{self.port_name}" if self.port_name else self.service

    def iptables_chains(self) -> tuple[str, list[tuple[str, Endpoint]]]:
        """KUBE-SVC-hash(label protocol) and KUBE-SEP-hash(label protocol endpoint) each."""
        base = self.label + self.protocol
        seps = [("KUBE-SEP-" + _chain_hash(base + str(e)), e) for e in self.endpoints]
        return "KUBE-SVC-" + _chain_hash(base), seps

    def nft_chains(self) -> tuple[str, list[tuple[str, Endpoint]]]:
        """service-HASH-ns/name/proto/port and endpoint-HASH-...__ip/port each."""
        base = f"{self.service}/{self.protocol}/{self.port_name}"
        eps = []
        for e in self.endpoints:
            ep_base = f"{base}__{e.ip}/{e.port}"
            eps.append((f"endpoint-{seed._b32_sha256(ep_base)[:8]}-{ep_base}", e))
        return f"service-{seed._b32_sha256(base)[:8]}-{base}", eps


def service_ports(spec: ClusterSpec) -> tuple[ServicePort, ...]:
    """prod/export (unnamed 80/tcp) and kube-dns's dns (53/udp) and dns-tcp (53/tcp)."""
    dns_ports = tuple(ServicePort(DNS_NAME, name, proto, DNS_IP, DNS_PORT, spec.dns_backends)
                      for name, proto in dns.DNS_PORTS)  # fmt: skip
    return (ServicePort(SVC_NAME, "", "tcp", SERVICE_IP, spec.service_port, spec.endpoints),
            *dns_ports)  # fmt: skip


def _chain_hash(text: str) -> str:
    return seed._b32_sha256(text)[:16]


def _iptables_service(sp: ServicePort, hairpin_masquerade: bool) -> list[str]:
    """A Service port's KUBE-SVC and KUBE-SEP rules (statistic rules for several endpoints)."""
    svc_chain, seps = sp.iptables_chains()
    p, label = sp.protocol, sp.label
    out = [
        (
            f"-A {svc_chain} ! -s {CLUSTER_CIDR} -d {sp.ip}/32 -p {p} -m comment "
            f'--comment "{label} cluster IP" -m {p} --dport {sp.port} -j KUBE-MARK-MASQ'
        )
    ]
    for i, (chain, ep) in enumerate(seps):
        left = len(seps) - i
        stat = f" -m statistic --mode random --probability {1.0 / left:0.10f}" if left > 1 else ""
        out.append(f'-A {svc_chain} -m comment --comment "{label} -> {ep}"{stat} -j {chain}')
    for chain, ep in seps:
        if hairpin_masquerade:
            out.append(f'-A {chain} -s {ep.ip}/32 -m comment --comment "{label}" -j KUBE-MARK-MASQ')
        out.append(
            f'-A {chain} -p {p} -m comment --comment "{label}" -m {p} -j DNAT --to-destination {ep}'
        )
    return out


def iptables_rules(spec: ClusterSpec) -> str:
    """nat and filter tables in iptables-restore format, in kube-proxy's iptables-mode shape."""
    ports = [sp for sp in service_ports(spec) if sp.endpoints]
    empty = [sp for sp in service_ports(spec) if not sp.endpoints]
    nat = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    for sp in ports:
        svc_chain, seps = sp.iptables_chains()
        nat += [f":{svc_chain} - [0:0]"] + [f":{c} - [0:0]" for c, _ in seps]
    nat += [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        (
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully"
        ),
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
    ]
    nat += [
        f"-A KUBE-SERVICES -d {sp.ip}/32 -p {sp.protocol} -m comment --comment "
        f'"{sp.label} cluster IP" -m {sp.protocol} --dport {sp.port} -j {sp.iptables_chains()[0]}'
        for sp in ports
    ]
    nat.append(
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
        'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
    )
    for sp in ports:
        nat += _iptables_service(sp, spec.hairpin_masquerade)
    nat.append("COMMIT")
    portals = '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals"'
    filt = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":KUBE-FORWARD - [0:0]",
        ":KUBE-SERVICES - [0:0]",
        f"-A INPUT {portals} -j KUBE-SERVICES",
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        f"-A FORWARD {portals} -j KUBE-SERVICES",
        f"-A OUTPUT {portals} -j KUBE-SERVICES",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        (
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
            "-m mark --mark 0x4000/0x4000 -j ACCEPT"
        ),
        (
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ),
    ]
    filt += [
        f'-A KUBE-SERVICES -d {sp.ip}/32 -p {sp.protocol} -m comment --comment "{sp.label} has '
        f'no endpoints" -m {sp.protocol} --dport {sp.port} -j REJECT --reject-with '
        "icmp-port-unreachable"
        for sp in empty
    ]
    filt.append("COMMIT")
    return "\n".join(nat + filt) + "\n"


def _nft_service(sp: ServicePort, hairpin_masquerade: bool) -> list[str]:
    """A Service port's endpoint chains and its service chain (numgen over the endpoints)."""
    svc_chain, eps = sp.nft_chains()
    out = []
    for chain, e in eps:
        masq = f"\t\tip saddr {e.ip} jump mark-for-masquerade\n" if hairpin_masquerade else ""
        out.append(f"\tchain {chain} {{\n{masq}\t\tmeta l4proto {sp.protocol} dnat to {e}\n\t}}")
    vmap = ", ".join(f"{i} : goto {c}" for i, (c, _) in enumerate(eps))
    out.append(
        f"\tchain {svc_chain} {{\n\t\tip daddr {sp.ip} {sp.protocol} dport {sp.port} "
        f"ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n"
        f"\t\tnumgen random mod {len(eps)} vmap {{ {vmap} }}\n\t}}"
    )
    return out


def nftables_rules(spec: ClusterSpec) -> str:
    """The ``ip kube-proxy`` table in kube-proxy's nftables-mode shape."""
    ports = [sp for sp in service_ports(spec) if sp.endpoints]
    empty = [sp for sp in service_ports(spec) if not sp.endpoints]
    out = ["table ip kube-proxy {", '\tcomment "rules for kube-proxy"']
    out += [
        "\tchain mark-for-masquerade {\n\t\tmeta mark set meta mark | 0x4000\n\t}",
        (
            "\tchain masquerading {\n\t\tmeta mark & 0x4000 == 0 return\n"
            "\t\tmeta mark set meta mark ^ 0x4000\n\t\tmasquerade fully-random\n\t}"
        ),
        '\tchain reject-chain {\n\t\tcomment "helper for @no-endpoint-services"\n\t\treject\n\t}',
        "\tchain forward {\n\t\tct state invalid drop\n\t\tmeta mark & 0x4000 == 0x4000 accept\n\t}",
    ]
    for sp in ports:
        out += _nft_service(sp, spec.hairpin_masquerade)
    svc_elems = ", ".join(
        f"{sp.ip} . {sp.protocol} . {sp.port} : goto {sp.nft_chains()[0]}" for sp in ports
    )
    noep = ", ".join(
        f'{sp.ip} . {sp.protocol} . {sp.port} comment "{sp.label}" : goto reject-chain'
        for sp in empty
    )
    for name, elems, comment in (
        ("service-ips", svc_elems, "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
        (
            "no-endpoint-services",
            noep,
            "vmap to drop or reject packets to services with no endpoints",
        ),
    ):
        body = f'\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcomment "{comment}"'
        if elems:
            body += f"\n\t\telements = {{ {elems} }}"
        out.append(f"\tmap {name} {{\n{body}\n\t}}")
    out += [
        "\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}",
        (
            "\tchain service-endpoints-check {\n"
            "\t\tip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\t}"
        ),
        (
            "\tchain filter-forward {\n\t\ttype filter hook forward priority -110; policy accept;\n"
            "\t\tct state new jump service-endpoints-check\n\t\tjump forward\n\t}"
        ),
        (
            "\tchain filter-output {\n\t\ttype filter hook output priority -110; policy accept;\n"
            "\t\tct state new jump service-endpoints-check\n\t}"
        ),
        (
            "\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
            "\t\tjump services\n\t}"
        ),
        (
            "\tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n"
            "\t\tjump services\n\t}"
        ),
        (
            "\tchain nat-postrouting {\n\t\ttype nat hook postrouting priority srcnat; "
            "policy accept;\n\t\tjump masquerading\n\t}"
        ),
        "}",
    ]
    return "\n".join(out) + "\n"


def load_rules(spec: ClusterSpec, node: int) -> None:
    """Load the Service's rules into one node, replacing what kube-proxy rules were there."""
    ns = spec.node_ns(node)
    if spec.proxy_mode == "iptables":
        netns.run_in(ns, ["iptables-restore", "-w", "5"], input_text=iptables_rules(spec))
    else:
        netns.run_in(ns, ["nft", "delete", "table", "ip", "kube-proxy"], check=False)
        netns.run_in(ns, ["nft", "-f", "/dev/stdin"], input_text=nftables_rules(spec))


# ---------------------------------------------------------------------------
# state


@dataclass(frozen=True)
class ClusterState:
    spec: ClusterSpec
    created_netns: tuple[str, ...] = ()
    cni_attached: tuple[str, ...] = ()
    host_veths: dict[str, str] = field(default_factory=dict)  # pod ns -> its port on cni0
    fault_notes: tuple[str, ...] = ()

    def to_json(self) -> str:
        d = {"version": 1, **asdict(self), "spec": self.spec.to_dict()}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        try:
            d = json.loads(text)
            if d.get("version") != 1:
                raise ValueError(f"unknown version {d.get('version')!r}")
            return cls(
                spec=ClusterSpec.from_dict(d["spec"]),
                created_netns=tuple(d["created_netns"]),
                cni_attached=tuple(d["cni_attached"]),
                host_veths=dict(d["host_veths"]),
                fault_notes=tuple(d["fault_notes"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HairtraceError(f"not a hairtrace cluster lab state file: {exc}") from exc


def save(state: ClusterState) -> ClusterState:
    seed.write_state(state.spec.state_file, state.to_json())
    return state


def load_state(prefix: str = "ht") -> ClusterState | None:
    try:
        text = ClusterSpec(prefix=prefix).state_file.read_text()
    except FileNotFoundError:
        return None
    return ClusterState.from_json(text)


# ---------------------------------------------------------------------------
# building


def _ip(ns: str, *args: str) -> None:
    netns.run_in(ns, ["ip", *args])


def _cni_config(spec: ClusterSpec, node: int) -> dict[str, Any]:
    return {
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "ipMasq": False,
        "hairpinMode": True,
        "mtu": 1450,
        "ipam": {
            "type": "host-local",
            "subnet": pod_subnet(node),
            "routes": [{"dst": CLUSTER_CIDR}],
            "dataDir": str(spec.work_dir / "cni" / spec.node_ns(node)),
        },
    }


def _attachment(pod: Pod) -> cni.Attachment:
    return cni.Attachment(
        container_id=f"hairtrace-{pod.ns}",
        netns_path=str(netns.NETNS_DIR / pod.ns),
        args={"IP": pod.ip},
    )


def _host_veth(result: dict[str, Any]) -> str:
    for itf in result.get("interfaces", []):
        name = itf.get("name")
        if isinstance(name, str) and name != "cni0" and not itf.get("sandbox"):
            return name
    raise HairtraceError("the CNI bridge plugin reported no host-side veth")


def _underlay(spec: ClusterSpec) -> None:
    n1 = spec.node_ns(1)
    if spec.nodes == 2:
        _ip(n1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            spec.node_ns(2))  # fmt: skip
    else:
        # a veth whose peer stays down: an uplink with no one behind it (no dummy module needed)
        _ip(n1, "link", "add", "eth0", "type", "veth", "peer", "name", "uplink")
    for n in range(1, spec.nodes + 1):
        ns = spec.node_ns(n)
        _ip(ns, "link", "set", "lo", "up")
        _ip(ns, "addr", "add", UNDERLAY.format(n) + "/24", "dev", "eth0")
        _ip(ns, "link", "set", "eth0", "up")
        _ip(ns, "route", "add", "default", "via", UNDERLAY.format(254), "dev", "eth0")
        netns.sysctl_write(ns, "net.ipv4.ip_forward", 1)


def _flannel(spec: ClusterSpec) -> None:
    """flannel.1 on each node and the routes, neighbours and FDB entries flanneld programs."""
    for n in range(1, spec.nodes + 1):
        ns = spec.node_ns(n)
        _ip(ns, "link", "add", "flannel.1", "address", _vtep_mac(n), "type", "vxlan",
            "id", str(VXLAN_VNI), "local", UNDERLAY.format(n), "dev", "eth0",
            "dstport", str(VXLAN_PORT), "nolearning")  # fmt: skip
        _ip(ns, "link", "set", "flannel.1", "mtu", "1450", "up")
        _ip(ns, "addr", "add", pod_subnet(n).replace(".0/24", ".0/32"), "dev", "flannel.1")
    for n in range(1, spec.nodes + 1):
        ns, other = spec.node_ns(n), 3 - n
        vtep = pod_subnet(other).replace("/24", "")
        _ip(ns, "route", "add", pod_subnet(other), "via", vtep, "dev", "flannel.1", "onlink")
        _ip(ns, "neigh", "replace", vtep, "lladdr", _vtep_mac(other), "dev", "flannel.1",
            "nud", "permanent")  # fmt: skip
        netns.run_in(ns, ["bridge", "fdb", "append", _vtep_mac(other), "dev", "flannel.1",
                          "dst", UNDERLAY.format(other)])  # fmt: skip


def _start_server(spec: ClusterSpec, pod: Pod) -> None:
    log = spec.work_dir / f"{pod.ns}.log"
    argv = [sys.executable or "python3", "-I", str(_HERE / "server.py"),
            "--bind", pod.ip, "--port", "80", "--name", pod.ns]  # fmt: skip
    with open(log, "ab") as out:
        subprocess.run(["setsid", "-f", *netns.exec_argv(pod.ns, argv)], stdin=subprocess.DEVNULL,
                       stdout=out, stderr=out, check=True, timeout=10)  # fmt: skip


def _start_dns(spec: ClusterSpec, pod: Pod) -> None:
    log = spec.work_dir / f"{pod.ns}.dnsmasq.log"
    with open(log, "ab") as out:
        subprocess.run(["setsid", "-f", *netns.exec_argv(pod.ns, dns.dnsmasq_argv(pod.ip, log))],
                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True,
                       timeout=10)  # fmt: skip


def _wait_dns(spec: ClusterSpec, timeout: float = 30.0) -> None:
    """Until every DNS endpoint pod answers the client directly (not through the Service)."""
    deadline = time.monotonic() + timeout
    for pod in spec.dns_pods:
        while True:
            got = dig(spec, server=pod.ip, timeout=1.0)
            if got.answered:
                break
            if time.monotonic() > deadline:
                log = spec.work_dir / f"{pod.ns}.dnsmasq.log"
                last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no log"]
                raise HairtraceError(
                    f"dnsmasq in {pod.ns} ({pod.ip}) did not answer the client: "
                    f"{got.status} {got.error}; its log: {last[0]}"
                )
            time.sleep(0.1)


def move_dns_endpoints(state: ClusterState, endpoints: tuple[Endpoint, ...]) -> ClusterState:
    """kube-dns's endpoints change (as kube-proxy rewrites them after a pod was replaced):
    dnsmasq starts in the new endpoint pods, every node gets the new rules. Conntrack
    entries are left as they are (what kube-proxy must clean up itself)."""
    spec = replace(state.spec, dns_endpoints=endpoints)
    old = {p.ns for p in state.spec.dns_pods}
    for pod in spec.dns_pods:
        if pod.ns not in old:
            _start_dns(spec, pod)
    _wait_dns(spec)
    for node in range(1, spec.nodes + 1):
        load_rules(spec, node)
    return save(replace(state, spec=spec))


def start_udp_flow(spec: ClusterSpec, sport: int, interval: float = 0.3) -> Path:
    """A long-lived DNS client in the client pod (udpflow.py: one socket, one source
    port, a query every interval) until the lab goes down; returns its log."""
    log = spec.work_dir / f"udpflow-{sport}.log"
    argv = [sys.executable or "python3", "-I", str(_HERE / "udpflow.py"), "--server", DNS_IP,
            "--port", str(DNS_PORT), "--sport", str(sport), "--interval", f"{interval:g}",
            "--log", str(log)]  # fmt: skip
    with open(spec.work_dir / f"udpflow-{sport}.out", "ab") as out:
        subprocess.run(["setsid", "-f", *netns.exec_argv(spec.client.ns, argv)],
                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True,
                       timeout=10)  # fmt: skip
    return log


def udp_flow_counts(log: Path) -> tuple[int, int]:
    """(sent, answered) of a udpflow client so far; (0, 0) before its first query."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0, 0
    for line in reversed(lines):
        words = line.split()
        if len(words) == 4 and words[0] == "sent" and words[2] == "answered":
            return int(words[1]), int(words[3])
    return 0, 0


def _wait_servers(spec: ClusterSpec, timeout: float = 60.0) -> None:
    """Until every pod answers the client directly (not through the Service)."""
    deadline = time.monotonic() + timeout
    for pod in spec.pods:
        while True:
            got = curl(spec, f"http://{pod.ip}/", timeout=1.0)
            if got.ok:
                break
            if time.monotonic() > deadline:
                raise HairtraceError(
                    f"pod {pod.ns} ({pod.ip}) did not answer the client: {got.error}"
                )
            time.sleep(0.1)


@dataclass(frozen=True)
class Reply:
    ok: bool
    exit_code: int
    http_status: int | None
    backend: str | None
    error: str


def curl(spec: ClusterSpec, url: str | None = None, timeout: float = 3.0) -> Reply:
    """One curl from the client pod (default: the Service)."""
    argv = ["curl", "-sS", "-m", f"{timeout:g}", "-w", "\n%{http_code}", url or spec.service_url]
    proc = netns.run_in(spec.client.ns, argv, timeout=timeout + 10, check=False)
    body, _, code = proc.stdout.rpartition("\n")
    status = int(code) if code.isdigit() and code != "000" else None
    words = body.split()
    return Reply(
        proc.returncode == 0 and status == 200,
        proc.returncode,
        status,
        words[1] if len(words) > 1 else None,
        proc.stderr.strip(),
    )


def load(spec: ClusterSpec, n: int = 300, timeout: float = 10.0) -> list[dict[str, Any]]:
    """n concurrent requests from the client pod to the Service (client.py); one dict each."""
    argv = [sys.executable or "python3", "-I", str(_HERE / "client.py"), "--host", SERVICE_IP,
            "--port", str(SERVICE_PORT), "-n", str(n), "--timeout", f"{timeout:g}"]  # fmt: skip
    proc = netns.run_in(spec.client.ns, argv, timeout=timeout * 3 + 30)
    try:
        return list(json.loads(proc.stdout)["connections"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HairtraceError(f"the load client printed no result: {exc}") from exc


def dig(
    spec: ClusterSpec,
    name: str = dns.DEFAULT_QUERY,
    *,
    server: str = DNS_IP,
    tcp: bool = False,
    timeout: float = 2.0,
    pod: Pod | None = None,
    sport: int | None = None,
) -> DigReply:
    """``dig @server +time=N +tries=1 [+tcp] NAME`` in the client pod (or ``pod``)."""
    ns = (pod or spec.client).ns
    return dns.dig(ns, name, server=server, tcp=tcp, timeout=timeout, sport=sport)


def dig_load(
    spec: ClusterSpec,
    n: int,
    pods: tuple[Pod, ...] | None = None,
    *,
    name: str = dns.DEFAULT_QUERY,
    tcp: bool = False,
    timeout: float = 2.0,
    parallel: int = 16,
    sport_base: int | None = None,
) -> list[DigReply]:
    """n DNS queries to the kube-dns Service from ``pods`` (default: the client), round-robin,
    up to ``parallel`` at once; one DigReply each, in query order (dns.dig_many)."""
    clients = [p.ns for p in (pods or (spec.client,))]
    return dns.dig_many(clients, n, name, tcp=tcp, timeout=timeout, parallel=parallel,
                        sport_base=sport_base)  # fmt: skip


def _build(state: ClusterState) -> ClusterState:
    spec = state.spec
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    for ns in spec.namespaces:
        netns.add(ns)
        state = save(replace(state, created_netns=(*state.created_netns, ns)))
    _underlay(spec)
    if spec.nodes == 2:
        _flannel(spec)
    for pod in spec.pods:
        state = save(replace(state, cni_attached=(*state.cni_attached, pod.ns)))
        result = cni.add(_cni_config(spec, pod.node), _attachment(pod),
                         run_in_netns=spec.node_ns(pod.node))  # fmt: skip
        if f"{pod.ip}/24" not in cni.result_addresses(result):
            raise HairtraceError(f"CNI gave {pod.ns} {cni.result_addresses(result)}, not {pod.ip}")
        state = save(replace(state, host_veths={**state.host_veths, pod.ns: _host_veth(result)}))
    for n in range(1, spec.nodes + 1):
        ns = spec.node_ns(n)
        if netns.sysctl_exists(ns, seed.BRIDGE_NF_CALL_IPTABLES):
            netns.sysctl_write(ns, seed.BRIDGE_NF_CALL_IPTABLES, spec.bridge_nf_call_iptables)
        load_rules(spec, n)
    for pod in spec.pods:
        _start_server(spec, pod)
    for pod in spec.dns_pods:
        _start_dns(spec, pod)
    _wait_servers(spec)
    _wait_dns(spec)
    return state


def up(spec: ClusterSpec) -> ClusterState:
    """Build the healthy cluster lab of ``spec`` (its fault is applied by tracer.lab.faults)."""
    seed._require_root()
    present = [ns for ns in spec.namespaces if netns.exists(ns)]
    if present or spec.state_file.exists():
        raise HairtraceError(
            f"a cluster lab already exists ({', '.join(present) or spec.state_file}); "
            "run lab down first"
        )
    shutil.rmtree(spec.work_dir, ignore_errors=True)
    state = save(ClusterState(spec))
    try:
        return _build(state)
    except BaseException as exc:
        try:
            down(spec.prefix)
        except HairtraceError as cleanup:
            raise HairtraceError(f"{exc}; cleanup also failed: {cleanup}") from exc
        raise


CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")
# the host's nf_conntrack_max while the conntrack-table-full fault holds it low
SAVED_CONNTRACK_MAX = STATE_ROOT / "nf_conntrack_max.saved"


def restore_conntrack_max() -> str | None:
    """Put back the nf_conntrack_max the table-full fault lowered; what was done."""
    if not SAVED_CONNTRACK_MAX.exists():
        return None
    old = SAVED_CONNTRACK_MAX.read_text().strip()
    CONNTRACK_MAX.write_text(old + "\n")
    SAVED_CONNTRACK_MAX.unlink()
    return f"nf_conntrack_max restored to {old}"


def down(prefix: str = "ht") -> list[str]:
    """Remove everything the cluster lab ``prefix`` created; [] if nothing existed."""
    seed._require_root()
    try:
        state = load_state(prefix)
    except HairtraceError:
        state = None
    spec = state.spec if state else ClusterSpec(prefix=prefix, nodes=2)
    done: list[str] = []
    problems: list[str] = []
    spared = {os.getpid(), os.getppid()}
    for pod in spec.pods:
        for pid in netns.pids(pod.ns) if netns.exists(pod.ns) else []:
            if pid not in spared and netns.pid_alive(pid):
                try:
                    seed._terminate(pid, grace=0.5)
                    done.append(f"stopped pid {pid} in {pod.ns}")
                except HairtraceError as exc:
                    problems.append(str(exc))
    for pod in spec.pods:
        node = spec.node_ns(pod.node)
        if state and pod.ns in state.cni_attached and netns.exists(node):
            try:
                cni.delete(_cni_config(spec, pod.node), _attachment(pod), run_in_netns=node)
                done.append(f"CNI DEL {pod.ns}")
            except HairtraceError as exc:
                problems.append(f"CNI DEL {pod.ns}: {exc}")
    names = list(dict.fromkeys([p.ns for p in spec.pods] + list(spec.namespaces)
                               + list(state.created_netns if state else ())))  # fmt: skip
    for ns in names:
        if netns.delete(ns):
            done.append(f"deleted netns {ns}")
    try:
        restored = restore_conntrack_max()
    except OSError as exc:
        problems.append(f"nf_conntrack_max not restored: {exc}")
    else:
        if restored:
            done.append(restored)
    shutil.rmtree(spec.work_dir, ignore_errors=True)
    for path in (spec.state_file, seed.temp_of(spec.state_file)):
        if path.exists():
            path.unlink()
            done.append(f"removed {path}")
    left = [ns for ns in names if netns.exists(ns)]
    if left:
        problems.append(f"netns still present: {', '.join(left)}")
    if problems:
        raise HairtraceError("cluster lab teardown incomplete: " + "; ".join(problems))
    return done
