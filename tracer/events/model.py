"""The event model every provider feeds and the analysis reads.

Point numbers mirror `enum ht_point` in bpf/hairtrace.h. Each point also has
a provider-neutral meaning (`PointInfo.kind`), which is all the analysis looks
at, so events from tracepoints, fentry or kprobes reassemble the same way.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import IntEnum

# TCP flag bits
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
# IP protocol numbers
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}
# ICMP error types and the codes hairtrace names (RFC 792)
ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED = 3, 11
ICMP_PORT_UNREACH, ICMP_FRAG_NEEDED = 3, 4
_ICMP_NAMES = {
    (3, 0): "net unreachable",
    (3, 1): "host unreachable",
    (3, 2): "protocol unreachable",
    (3, 3): "port unreachable",
    (3, 4): "fragmentation needed",
    (3, 9): "net prohibited",
    (3, 10): "host prohibited",
    (3, 13): "communication administratively prohibited",
    (11, 0): "TTL exceeded in transit",
    (11, 1): "fragment reassembly time exceeded",
    (12, 0): "parameter problem",
}


def icmp_name(icmp_type: int, code: int) -> str:
    """An ICMP error in words: "port unreachable" (type 3, code 3), ..."""
    return _ICMP_NAMES.get((icmp_type, code), f"ICMP type {icmp_type} code {code}")


# enum ip_conntrack_status bits (include/uapi/linux/netfilter/nf_conntrack_common.h)
IPS_EXPECTED, IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 1, 2, 4, 8
IPS_SRC_NAT, IPS_DST_NAT = 0x10, 0x20
IPS_SRC_NAT_DONE, IPS_DST_NAT_DONE, IPS_DYING = 0x80, 0x100, 0x200
_CT_STATUS_NAMES = (
    (IPS_SEEN_REPLY, "SEEN_REPLY"),
    (IPS_ASSURED, "ASSURED"),
    (IPS_CONFIRMED, "CONFIRMED"),
    (IPS_SRC_NAT, "SRC_NAT"),
    (IPS_DST_NAT, "DST_NAT"),
    (IPS_SRC_NAT_DONE, "SRC_NAT_DONE"),
    (IPS_DST_NAT_DONE, "DST_NAT_DONE"),
    (IPS_DYING, "DYING"),
)
# enum ip_conntrack_info
CTINFO_NAMES = {
    0: "ESTABLISHED",
    1: "RELATED",
    2: "NEW",
    3: "ESTABLISHED_REPLY",
    4: "RELATED_REPLY",
    7: "UNTRACKED",
}
NF_HOOKS = {0: "PREROUTING", 1: "INPUT", 2: "FORWARD", 3: "OUTPUT", 4: "POSTROUTING"}


class Point(IntEnum):
    """enum ht_point (bpf/hairtrace.h)."""

    DEV_RX = 1
    DEV_TX = 2
    DROP = 3
    TCP_RESET = 4
    NF_PRE_CT = 5
    NF_PRE_NAT = 6
    NF_OUT_CT = 7
    NF_OUT_NAT = 8
    NF_FORWARD = 9
    NF_POST_NAT = 10
    NF_IN_NAT = 11
    BR_HANDLE_FRAME = 16
    BR_FORWARD = 17
    BR_PASS_UP = 18
    BR_NF_PRE_ROUTING = 19
    CT_IN = 20
    CT_CONFIRM = 21
    NAT_MANIP = 22
    NAT_SETUP = 23
    TCP_V4_SEND_RESET = 24
    BR_DEV_XMIT = 25


@dataclass(frozen=True)
class PointInfo:
    """What a point means, independent of the provider that took it.

    kind: dev_rx, dev_tx, drop, reset, netfilter, bridge, bridge_nf, conntrack, nat.
    """

    name: str
    kind: str
    hook: str | None = None


POINTS: dict[int, PointInfo] = {
    Point.DEV_RX: PointInfo("netif_receive_skb", "dev_rx"),
    Point.DEV_TX: PointInfo("net_dev_start_xmit", "dev_tx"),
    Point.DROP: PointInfo("kfree_skb", "drop"),
    Point.TCP_RESET: PointInfo("tcp_send_reset", "reset"),
    Point.NF_PRE_CT: PointInfo("nf:PREROUTING@conntrack", "netfilter", "PREROUTING"),
    Point.NF_PRE_NAT: PointInfo("nf:PREROUTING@dnat", "netfilter", "PREROUTING"),
    Point.NF_OUT_CT: PointInfo("nf:OUTPUT@conntrack", "netfilter", "OUTPUT"),
    Point.NF_OUT_NAT: PointInfo("nf:OUTPUT@dnat", "netfilter", "OUTPUT"),
    Point.NF_FORWARD: PointInfo("nf:FORWARD@filter", "netfilter", "FORWARD"),
    Point.NF_POST_NAT: PointInfo("nf:POSTROUTING@snat", "netfilter", "POSTROUTING"),
    Point.NF_IN_NAT: PointInfo("nf:INPUT@snat", "netfilter", "INPUT"),
    Point.BR_HANDLE_FRAME: PointInfo("br_handle_frame", "bridge"),
    Point.BR_FORWARD: PointInfo("br_forward", "bridge"),
    Point.BR_PASS_UP: PointInfo("br_pass_frame_up", "bridge"),
    Point.BR_NF_PRE_ROUTING: PointInfo("br_nf_pre_routing", "bridge_nf"),
    Point.CT_IN: PointInfo("nf_conntrack_in", "conntrack"),
    Point.CT_CONFIRM: PointInfo("__nf_conntrack_confirm", "conntrack"),
    Point.NAT_MANIP: PointInfo("nf_nat_manip_pkt", "nat"),
    Point.NAT_SETUP: PointInfo("nf_nat_setup_info", "nat"),
    Point.TCP_V4_SEND_RESET: PointInfo("tcp_v4_send_reset", "reset"),
    Point.BR_DEV_XMIT: PointInfo("br_dev_xmit", "bridge"),
}

# Kinds that prove netfilter (conntrack / NAT) saw the packet. Not "bridge_nf":
# br_nf_pre_routing is entered for every bridged IPv4 frame once br_netfilter is
# loaded, and returns at once when bridge-nf-call-iptables is off.
NETFILTER_KINDS = frozenset({"netfilter", "conntrack", "nat"})


def service_label(ip: str, port: int) -> str:
    """How text output writes the traced Service: "IP:PORT", or "IP:any" for every port
    (the JSON report's "service" then has "port": 0)."""
    return f"{ip}:{port or 'any'}"


def point_info(point: int) -> PointInfo:
    return POINTS.get(point, PointInfo(f"point-{point}", "unknown"))


@dataclass(frozen=True, order=True)
class Tuple:
    """A directional 4-tuple (dotted-quad addresses, host-order ports)."""

    src: str
    sport: int
    dst: str
    dport: int

    def reversed(self) -> Tuple:
        return Tuple(self.dst, self.dport, self.src, self.sport)

    def __str__(self) -> str:
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}"


@dataclass(frozen=True)
class Conntrack:
    """The conntrack entry a packet carried at a point."""

    id: int
    status: int
    ctinfo: int
    orig: Tuple
    reply: Tuple

    @property
    def status_names(self) -> list[str]:
        return [name for bit, name in _CT_STATUS_NAMES if self.status & bit]

    @property
    def dnat(self) -> bool:
        """The reply tuple's source is not the original destination: DNAT bound."""
        return (self.reply.src, self.reply.sport) != (self.orig.dst, self.orig.dport)

    @property
    def snat(self) -> bool:
        return (self.reply.dst, self.reply.dport) != (self.orig.src, self.orig.sport)

    def to_dict(self) -> dict[str, object]:
        return {
            "id": f"{self.id:#x}",
            "state": CTINFO_NAMES.get(self.ctinfo, str(self.ctinfo)),
            "status": self.status_names,
            "original": str(self.orig),
            "reply": str(self.reply),
        }


@dataclass(frozen=True)
class Event:
    """One observation of one packet at one point (struct ht_event, decoded)."""

    ts_ns: int
    point: int
    netns: int
    ifindex: int
    dev: str
    tuple: Tuple
    proto: int
    tcp_flags: int
    seq: int
    ack_seq: int
    ip_id: int
    skb: int = 0
    hook: int = 0xFF
    nf_prio: int = 0
    ct: Conntrack | None = None
    untracked: bool = False
    reason: int = 0
    location: int = 0
    aux: int = 0
    # an ICMP error (proto IPPROTO_ICMP): tuple is the packet it quotes, inner_proto that
    # packet's protocol, seq / ack_seq the error's own source / destination addresses
    inner_proto: int = 0
    icmp_type: int = 0
    icmp_code: int = 0

    @property
    def info(self) -> PointInfo:
        return point_info(self.point)

    @property
    def is_icmp(self) -> bool:
        return self.proto == IPPROTO_ICMP

    @property
    def flow_proto(self) -> int:
        """The protocol of the flow this event belongs to (an ICMP error's: the quoted one)."""
        return self.inner_proto if self.proto == IPPROTO_ICMP else self.proto

    @property
    def flow_tuple(self) -> Tuple:
        """The tuple as the flow's packets carry it: an ICMP error travels back towards
        the source of the packet it quotes, so it is that packet's tuple reversed."""
        return self.tuple.reversed() if self.proto == IPPROTO_ICMP else self.tuple

    @property
    def icmp_src(self) -> str:
        """An ICMP error's own source address: who sent it."""
        return socket.inet_ntoa(self.seq.to_bytes(4, "big"))

    @property
    def icmp_dst(self) -> str:
        return socket.inet_ntoa(self.ack_seq.to_bytes(4, "big"))
