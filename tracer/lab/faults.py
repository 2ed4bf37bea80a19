"""The fault catalogue: each a small, readable change on top of the healthy cluster lab.

A fault says what it breaks, which cause code hairtrace should give, and where it
can be reproduced (some need a modular kernel: the VM). ``apply`` runs after the
healthy lab is up and touches only the lab's own namespaces. docs/failure-modes.md
explains each one.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tracer.errors import HairtraceError, UsageError
from tracer.lab import cluster, netns, seed
from tracer.lab.cluster import ClusterSpec, ClusterState, Endpoint


@dataclass(frozen=True)
class Fault:
    name: str
    cause: str  # the cause code hairtrace gives ("" for a healthy variant)
    summary: str
    nodes: int = 1  # the lab it needs
    apply: Callable[[ClusterState], str] | None = None  # returns what it changed
    self_service: bool = False  # the Service's endpoint is the client pod itself
    endpoints: tuple[Endpoint, ...] | None = None  # None = the default endpoints
    hairpin_masquerade: bool = True
    bridge_nf: int = 1
    needs: str = ""  # a kernel condition checked before building
    service_port: int = cluster.SERVICE_PORT  # the Service's port in the rules (clients: 80)
    # what the scenario's client does: "curl" (HTTP to the Service), "dig" (a DNS query over
    # UDP to kube-dns, 100.67.30.140:53, traced with --svc 100.67.30.140:53/udp), "flow"
    # (the fault runs a long-lived DNS client; the scenario traces it for a while),
    # "curl-big" (HTTP GET of /big: 256 KiB)
    client: str = "curl"
    dns_endpoints: tuple[Endpoint, ...] | None = None  # None = the default (pod n1-b:53)

    def spec(self, prefix: str, proxy_mode: str, nodes: int | None = None) -> ClusterSpec:
        n = max(self.nodes, nodes or 1)
        base = ClusterSpec(prefix=prefix, nodes=n, proxy_mode=proxy_mode)
        eps = self.endpoints
        if self.self_service:
            eps = (Endpoint(base.client.ip, 80),)
        return replace(
            base,
            endpoints=cluster.default_endpoints(n) if eps is None else eps,
            fault=self.name,
            hairpin_masquerade=self.hairpin_masquerade,
            bridge_nf_call_iptables=self.bridge_nf,
            service_port=self.service_port,
            dns_endpoints=self.dns_endpoints,
        )


def _n1(state: ClusterState) -> str:
    return state.spec.node_ns(1)


def _sysctl(key: str, value: int) -> Callable[[ClusterState], str]:
    def apply(state: ClusterState) -> str:
        netns.sysctl_write(_n1(state), key, value)
        return f"{key}={value} in {_n1(state)}"

    return apply


def _hairpin_off(state: ClusterState) -> str:
    port = state.host_veths[state.spec.client.ns]
    netns.run_in(_n1(state), ["ip", "link", "set", port, "type", "bridge_slave", "hairpin", "off"])
    return f"hairpin off on bridge port {port} ({state.spec.client.ns}) in {_n1(state)}"


def _forward_drop(state: ClusterState) -> str:
    netns.run_in(_n1(state), ["iptables", "-w", "5", "-P", "FORWARD", "DROP"])
    return f"iptables -P FORWARD DROP in {_n1(state)} (as Docker sets it)"


def _conntrack_miss(state: ClusterState) -> str:
    # The reply is looked up in another conntrack zone: it finds no entry, exactly as
    # when the entry was flushed, expired or evicted between SYN and SYN+ACK.
    rule = ["-t", "raw", "-A", "PREROUTING", "-i", "cni0", "-p", "tcp", "--sport", "80",
            "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "CT", "--zone", "7"]  # fmt: skip
    netns.run_in(_n1(state), ["iptables", "-w", "5", *rule])
    return "SYN+ACKs from pods are looked up in conntrack zone 7, where no entry exists"


def _fdb_missing(state: ClusterState) -> str:
    other = cluster.UNDERLAY.format(2)
    argv = ["bridge", "fdb", "del", cluster._vtep_mac(2), "dev", "flannel.1", "dst", other]
    netns.run_in(_n1(state), argv)
    return f"removed the FDB entry of node 2's VTEP ({other}) from flannel.1 in {_n1(state)}"


def _unreachable(state: ClusterState) -> str:
    backend = state.spec.endpoints[0].ip
    netns.run_in(_n1(state), ["ip", "route", "add", "unreachable", f"{backend}/32"])
    return f"unreachable route to the backend {backend} in {_n1(state)}"


STALE_FLOW_SPORT = 5300  # the long-lived DNS client's source port (stale-conntrack-entry)


def _stale_conntrack(state: ClusterState) -> str:
    """A client keeps one UDP flow to kube-dns (a query every 0.3 s from one port); its
    endpoint pod n1-b is replaced by n2-c: kube-proxy's rules now DNAT to n2-c, n1-b's
    address is gone, and nobody deletes the flow's conntrack entry, which still DNATs
    every query of the flow to n1-b."""
    spec = state.spec
    log = cluster.start_udp_flow(spec, STALE_FLOW_SPORT)
    deadline = time.monotonic() + 20
    while cluster.udp_flow_counts(log)[1] < 3:
        if time.monotonic() > deadline:
            raise HairtraceError(f"the long-lived DNS client got no answers: see {log}")
        time.sleep(0.1)
    old = spec.dns_backends[0]
    new = Endpoint(spec.pods[2].ip, cluster.DNS_PORT)  # n2-c
    state = cluster.move_dns_endpoints(state, (new,))
    gone = next(p for p in spec.pods if p.ip == old.ip)
    netns.run_in(gone.ns, ["ip", "addr", "flush", "dev", "eth0"])
    netns.run_in(gone.ns, ["ip", "link", "set", "eth0", "down"])
    cluster.save(state)
    return (f"kube-dns endpoint {old} replaced by {new} in the rules; {gone.ns}'s address "
            f"removed; the flow from {spec.client.ip}:{STALE_FLOW_SPORT} keeps its entry")  # fmt: skip


CONNTRACK_MAX, SAVED_CONNTRACK_MAX = cluster.CONNTRACK_MAX, cluster.SAVED_CONNTRACK_MAX
WATCHDOG_S = 600  # the watchdog restores nf_conntrack_max then, should nothing call down


def _conntrack_count(ns: str | None) -> int:
    if ns is None:
        return int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
    return int(netns.sysctl_read(ns, "net.netfilter.nf_conntrack_count"))


def _table_full(state: ClusterState) -> str:
    """nf_conntrack_max (global: only the host's netns can set it) is lowered to just above
    the fullest namespace on the machine, and the node's table is filled with ASSURED
    entries (conntrack -I, which early drop never evicts): a new flow through the node
    gets no entry. The old value is saved for cluster.down(); a watchdog restores it too."""
    node = _n1(state)
    old = CONNTRACK_MAX.read_text().strip()
    fullest = max([_conntrack_count(None)] + [_conntrack_count(ns) for ns in netns.list_netns()])
    low = max(128, fullest + 64)
    SAVED_CONNTRACK_MAX.parent.mkdir(parents=True, exist_ok=True)
    if not SAVED_CONNTRACK_MAX.exists():
        SAVED_CONNTRACK_MAX.write_text(old + "\n")
    watchdog = (f"sleep {WATCHDOG_S}; [ \"$(cat {CONNTRACK_MAX})\" = {low} ] && "
                f"echo {old} > {CONNTRACK_MAX}; rm -f {SAVED_CONNTRACK_MAX}")  # fmt: skip
    subprocess.run(["setsid", "-f", "sh", "-c", watchdog], check=True, timeout=10,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    CONNTRACK_MAX.write_text(f"{low}\n")
    filler = 0
    while _conntrack_count(node) < low:
        filler += 1
        argv = ["conntrack", "-I", "-p", "udp", "-s", "198.18.0.1", "-d", "198.18.0.2",
                "--sport", str(10000 + filler), "--dport", "9", "-t", "300", "-u", "ASSURED"]  # fmt: skip
        netns.run_in(node, argv, check=False)
        if filler > low + 64:
            raise HairtraceError(f"could not fill the conntrack table of {node}")
    return (
        f"nf_conntrack_max {old} -> {low} (global; restored at lab down); the table of "
        f"{node} filled with {filler} ASSURED entries"
    )


INSERT_FAILED_SNAT = "100.96.54.1:40000"


def _insert_failed(state: ClusterState) -> str:
    """Every DNS query to pod B is SNATed to one address and port: a kept flow (the
    long-lived client) holds that tuple, so the entry of any other flow to pod B clashes
    with it and cannot be confirmed."""
    node = _n1(state)
    rule = ["-t", "nat", "-I", "POSTROUTING", "-d", "100.96.54.247/32", "-p", "udp",
            "--dport", "53", "-j", "SNAT", "--to-source", INSERT_FAILED_SNAT]  # fmt: skip
    netns.run_in(node, ["iptables", "-w", "5", *rule])
    log = cluster.start_udp_flow(state.spec, STALE_FLOW_SPORT)
    deadline = time.monotonic() + 20
    while cluster.udp_flow_counts(log)[1] < 2:
        if time.monotonic() > deadline:
            raise HairtraceError(f"the long-lived DNS client got no answers: see {log}")
        time.sleep(0.1)
    return (
        f"DNS to pod B SNATed to {INSERT_FAILED_SNAT} only, in {node}; a kept flow from "
        f"port {STALE_FLOW_SPORT} holds that tuple"
    )


def _mtu_blackhole(state: ClusterState) -> str:
    """Pods with MTU 1500 (a CNI config that ignores the overlay) over flannel.1's 1450:
    full-sized segments from node 2's pod cannot leave node 2, and the ICMP
    fragmentation-needed node 2 sends back to its pod is dropped there (a firewall that
    blocks ICMP), so the sender never learns the path MTU."""
    spec = state.spec
    for pod in spec.pods:
        node = spec.node_ns(pod.node)
        netns.run_in(pod.ns, ["ip", "link", "set", "eth0", "mtu", "1500"])
        netns.run_in(node, ["ip", "link", "set", state.host_veths[pod.ns], "mtu", "1500"])
    for n in range(1, spec.nodes + 1):
        netns.run_in(spec.node_ns(n), ["ip", "link", "set", "cni0", "mtu", "1500"])
    rule = ["-I", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"]
    netns.run_in(spec.node_ns(2), ["iptables", "-w", "5", *rule])
    return (
        "pods and cni0 at MTU 1500 over flannel.1 (1450); ICMP fragmentation-needed "
        f"dropped in {spec.node_ns(2)}'s OUTPUT"
    )


def _insert_failed_tcp(state: ClusterState) -> str:
    """The same clash over TCP: connections to pod B port 80 SNATed to one address and
    port, which a long transfer (a rate-limited download from port 5300) holds."""
    spec, node = state.spec, _n1(state)
    rule = ["-t", "nat", "-I", "POSTROUTING", "-d", "100.96.54.247/32", "-p", "tcp",
            "--dport", "80", "-j", "SNAT", "--to-source", INSERT_FAILED_SNAT]  # fmt: skip
    netns.run_in(node, ["iptables", "-w", "5", *rule])
    log = spec.work_dir / "kept-download.log"
    argv = ["curl", "-sS", "-o", "/dev/null", "--local-port", str(STALE_FLOW_SPORT),
            "--limit-rate", "2k", "-m", "600", f"http://{cluster.SERVICE_IP}/big"]  # fmt: skip
    with open(log, "ab") as out:
        subprocess.run(["setsid", "-f", *netns.exec_argv(spec.client.ns, argv)],
                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True,
                       timeout=10)  # fmt: skip
    time.sleep(1.0)  # its handshake is done and its entry confirmed
    return (
        f"TCP to pod B:80 SNATed to {INSERT_FAILED_SNAT} only, in {node}; a slow "
        f"download from port {STALE_FLOW_SPORT} holds that tuple"
    )


def _blackhole(state: ClusterState) -> str:
    ns = state.spec.pods[1].ns
    netns.run_in(ns, ["ip", "route", "add", "blackhole", f"{state.spec.client.ip}/32"])
    return f"blackhole route to the client in {ns}: its SYN+ACK is never sent"


def _require_no_br_netfilter(spec: ClusterSpec) -> None:
    if Path("/sys/module/br_netfilter").exists() or Path("/proc/sys/net/bridge").exists():
        raise HairtraceError(
            "fault no-br-netfilter needs a kernel where br_netfilter is not loaded; here it "
            "is loaded or built in. Reproduce it in the VM: scripts/vm-run -- sh -c "
            "'modprobe -r br_netfilter && hairtrace lab up --fault no-br-netfilter'"
        )


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("none", "", "healthy: pods on one bridge, bridge-nf-call-iptables=1"),
        Fault("two-node", "", "healthy: two nodes over flannel VXLAN, endpoints on both", 2),
        Fault(
            "self-call",
            "",
            "healthy: a pod calls its own Service, hairpin on and kube-proxy's masquerade",
            self_service=True,
        ),
        Fault(
            "bridge-nf-off",
            "bridge-nf-call-iptables-off",
            "the seed case: bridge-nf-call-iptables=0, reply bridged past conntrack",
            apply=_sysctl(seed.BRIDGE_NF_CALL_IPTABLES, 0),
            bridge_nf=0,
        ),
        Fault(
            "no-br-netfilter",
            "br-netfilter-not-loaded",
            "br_netfilter not loaded: bridged frames never reach iptables (VM only)",
            needs="no-br-netfilter",
        ),
        Fault(
            "hairpin-off",
            "hairpin-mode-off",
            "pod calls its own Service; its bridge port has hairpin mode off",
            apply=_hairpin_off,
            self_service=True,
        ),
        Fault(
            "hairpin-no-masquerade",
            "hairpin-without-masquerade",
            "pod calls its own Service; kube-proxy's hairpin MASQUERADE rule is missing",
            self_service=True,
            hairpin_masquerade=False,
        ),
        Fault(
            "service-port-changed",
            "no-such-service",
            "the Service's port is 8080 in kube-proxy's rules; the client still calls port 80",
            service_port=8080,
        ),
        Fault(
            "forward-drop",
            "dropped-by-rule",
            "FORWARD policy DROP (Docker's), nothing accepts new pod-to-pod traffic",
            apply=_forward_drop,
        ),
        Fault(
            "no-endpoints",
            "service-no-endpoints",
            "the Service has no ready endpoints: kube-proxy's REJECT",
            endpoints=(),
        ),
        Fault(
            "conntrack-miss",
            "reply-without-conntrack",
            "the SYN+ACK finds no conntrack entry (INVALID), KUBE-FORWARD drops it",
            apply=_conntrack_miss,
        ),
        Fault(
            "ip-forward-off",
            "ip-forward-off",
            "net.ipv4.ip_forward=0 on the node",
            apply=_sysctl("net.ipv4.ip_forward", 0),
        ),
        Fault(
            "wrong-target-port",
            "backend-refused",
            "the endpoint's port (8080) has no listener: the backend resets",
            endpoints=(Endpoint("100.96.54.247", 8080),),
        ),
        Fault(
            "vxlan-fdb-missing",
            "overlay-no-remote",
            "two nodes; flannel.1 on node 1 lacks node 2's FDB entry: some requests time out",
            2,
            apply=_fdb_missing,
        ),
        Fault(
            "route-unreachable",
            "packet-dropped",
            "a stale 'unreachable' route to the backend on the node: a stack drop",
            apply=_unreachable,
        ),
        Fault(
            "dns",
            "",
            "healthy DNS: a query over UDP to kube-dns, answered by dnsmasq in pod B",
            client="dig",
        ),
        Fault(
            "dns-bridge-nf-off",
            "bridge-nf-call-iptables-off",
            "the seed case over UDP: the DNS reply is bridged back past conntrack, dig times out",
            apply=_sysctl(seed.BRIDGE_NF_CALL_IPTABLES, 0),
            bridge_nf=0,
            client="dig",
        ),
        Fault(
            "dns-no-endpoints",
            "service-no-endpoints",
            "kube-dns has no endpoints: kube-proxy's REJECT answers ICMP port unreachable",
            client="dig",
            dns_endpoints=(),
        ),
        Fault(
            "dns-wrong-target-port",
            "backend-refused",
            "kube-dns's endpoint port (5353) has no listener: the pod answers port unreachable",
            client="dig",
            dns_endpoints=(Endpoint("100.96.54.247", 5353),),
        ),
        Fault(
            "stale-conntrack-entry",
            "stale-conntrack-entry",
            "a kept UDP flow to kube-dns outlives its endpoint: its conntrack entry still "
            "DNATs to the removed pod",
            2,
            apply=_stale_conntrack,
            client="flow",
        ),
        Fault(
            "conntrack-table-full",
            "conntrack-table-full",
            "the node's conntrack table is full (nf_conntrack_max, global: restored at lab "
            "down): a new DNS query gets no entry",
            apply=_table_full,
            client="dig",
        ),
        Fault(
            "conntrack-insert-failed",
            "conntrack-insert-failed",
            "DNS to pod B is SNATed to one address:port a kept flow holds: the next flow's "
            "entry clashes and cannot be confirmed",
            apply=_insert_failed,
            client="dig",
        ),
        Fault(
            "conntrack-insert-failed-tcp",
            "conntrack-insert-failed",
            "the same clash over TCP: connections to pod B are SNATed to the address:port a "
            "long download holds",
            apply=_insert_failed_tcp,
            endpoints=(Endpoint("100.96.54.247", 80),),
        ),
        Fault(
            "mtu-blackhole",
            "mtu-blackhole",
            "pod MTU 1500 over VXLAN 1450, ICMP frag-needed blocked: large responses from "
            "node 2's pod never arrive",
            2,
            apply=_mtu_blackhole,
            endpoints=(Endpoint("100.96.55.10", 80),),
            client="curl-big",
        ),
        Fault(
            "backend-blackhole",
            "unexplained",
            "the backend has a blackhole route to the client (a cause hairtrace has no code for)",
            apply=_blackhole,
        ),
    )
}


def get(name: str) -> Fault:
    try:
        return FAULTS[name]
    except KeyError:
        raise UsageError(
            f"unknown fault {name!r}; known: {', '.join(FAULTS)} (see hairtrace lab up --list-faults)"
        ) from None


def up(
    name: str, *, prefix: str = "ht", proxy_mode: str = "iptables", nodes: int | None = None
) -> ClusterState:
    """Build the healthy cluster lab for fault ``name``, then apply the fault."""
    fault = get(name)
    spec = fault.spec(prefix, proxy_mode, nodes)
    if fault.needs == "no-br-netfilter":
        seed._require_root()
        _require_no_br_netfilter(spec)
    state = cluster.up(spec)
    if fault.apply is None:
        return state
    try:
        note = fault.apply(state)
    except HairtraceError:
        cluster.down(prefix)
        raise
    return cluster.save(replace(state, fault_notes=(*state.fault_notes, note)))
