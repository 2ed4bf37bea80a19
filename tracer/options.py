"""Validated user input: service address, port, durations."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from tracer.errors import UsageError

# TCP packets without SYN, FIN or RST, and UDP datagrams, emitted per tuple, probe point
# and device (struct ht_config.data_budget): the handshake's ACK and the first data of each
# direction, with room for a few retransmissions; a UDP flow's first 8 requests and
# replies. 0 emits every packet.
DEFAULT_DATA_BUDGET = 8


PROTOCOLS = ("tcp", "udp")  # what --svc traces without /PROTO


# a Kubernetes namespace or Service name (RFC 1123 label) and a port name (IANA_SVC_NAME)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
_IP_FORM = re.compile(r"^\d+(\.\d+){3}(:[^/]*)?(/[^/]*)?$")
# IP[:PORT]/LEN[/PROTO]: a prefix length is digits, a protocol never is
_RANGE_FORM = re.compile(r"^[\d.]+(:[^/]*)?/\d+(/[^/]*)?$")
_NAME_FORM = "expected an IPv4 address or NAMESPACE/NAME, then [:PORT][/tcp|/udp]"


@dataclass(frozen=True)
class ServiceTarget:
    """What --svc asked for: an address, or a Service by name still to be resolved on the
    node (ip None). port 0: any port; port_name: a named port of a Service by name."""

    ip: str | None
    port: int
    protocols: tuple[str, ...]
    name: str | None = None  # "namespace/name"
    port_name: str | None = None
    prefix: int = 32  # a range of Service addresses (ip its network address): 'CIDR/LEN'


def parse_service_range(spec: str) -> ServiceTarget:
    """'IP/LEN[/tcp|/udp]': every Service address in the range, every port (a range takes
    no port: its Services have different ones). Digits after the first slash are a prefix
    length, so the form cannot be taken for 'IP/tcp'; /32 is the plain address."""
    net, has_proto, proto = spec.partition("/")[2].partition("/")
    protos: tuple[str, ...] = PROTOCOLS
    if has_proto:
        if proto.lower() not in PROTOCOLS:
            raise UsageError(f"bad service protocol '{proto}': expected tcp or udp")
        protos = (proto.lower(),)
    host = spec.partition("/")[0]
    if ":" in host:
        raise UsageError(
            f"bad service range '{spec}': a range takes no port (every port of every Service "
            "in it is traced); give IP:PORT for one Service"
        )
    if not net.isdigit() or not 1 <= int(net) <= 32:
        raise UsageError(f"bad service range '{spec}': expected a prefix length 1-32")
    ip, _port, _protos = parse_service_spec(host, allow_proto=False)
    network = ipaddress.ip_network(f"{ip}/{int(net)}", strict=False)
    if str(network.network_address) != ip:
        raise UsageError(f"bad service range '{spec}': host bits set (did you mean {network}?)")
    return ServiceTarget(ip, 0, protos, prefix=network.prefixlen)


def parse_service_target(spec: str) -> ServiceTarget:
    """--svc: 'IP[:PORT][/PROTO]' or 'NAMESPACE/NAME[:PORT|:PORTNAME][/PROTO]'."""
    head, slash, tail = spec.rpartition("/")
    if not slash and spec.count(":") <= 1 and _DNS_LABEL.match(spec.partition(":")[0]):
        raise UsageError(f"bad service '{spec}': {_NAME_FORM} (a name needs its namespace)")
    if _RANGE_FORM.match(spec):
        return parse_service_range(spec)
    if not slash or _IP_FORM.match(spec):
        return ServiceTarget(*parse_service_spec(spec))
    protos: tuple[str, ...] = PROTOCOLS
    if spec.count("/") >= 2:  # NAMESPACE/NAME.../PROTO
        if tail.lower() not in PROTOCOLS:
            raise UsageError(f"bad service protocol '{tail}': expected tcp or udp")
        protos, spec = (tail.lower(),), head
    ns, _, rest = spec.partition("/")
    name, colon, port_s = rest.partition(":")
    if not _DNS_LABEL.match(ns) or not _DNS_LABEL.match(name):
        raise UsageError(f"bad service '{spec}': {_NAME_FORM}")
    if not colon:
        return ServiceTarget(None, 0, protos, f"{ns}/{name}")
    if port_s.isdigit():
        if not 1 <= int(port_s) <= 65535:
            raise UsageError(f"bad service port '{port_s}': expected 1-65535")
        return ServiceTarget(None, int(port_s), protos, f"{ns}/{name}")
    if not _PORT_NAME.match(port_s) or not any(c.isalpha() for c in port_s):
        raise UsageError(f"bad service port '{port_s}': expected 1-65535 or a port name")
    return ServiceTarget(None, 0, protos, f"{ns}/{name}", port_s)


def parse_service(spec: str) -> tuple[str, int]:
    """'IP[:PORT]' -> (ip, port); port 0 means any port of the service IP."""
    ip, port, _protos = parse_service_spec(spec, allow_proto=False)
    return ip, port


def parse_service_spec(spec: str, *, allow_proto: bool = True) -> tuple[str, int, tuple[str, ...]]:
    """'IP[:PORT][/tcp|/udp]' -> (ip, port, protocols); port 0 means any port of the
    service IP; without /PROTO both TCP and UDP are traced."""
    protos: tuple[str, ...] = PROTOCOLS
    if allow_proto and "/" in spec:
        spec, _, proto = spec.rpartition("/")
        if proto.lower() not in PROTOCOLS:
            raise UsageError(f"bad service protocol '{proto}': expected tcp or udp")
        protos = (proto.lower(),)
    host, sep, port_s = spec.rpartition(":") if spec.count(":") == 1 else (spec, "", "")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"bad service address '{host}': expected an IPv4 address") from None
    if ip.version != 4:
        raise UsageError(f"bad service address '{host}': only IPv4 is supported")
    if not sep:
        return str(ip), 0, protos
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise UsageError(f"bad service port '{port_s}': expected 1-65535")
    return str(ip), int(port_s), protos


_HOST_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(\.{_HOST_LABEL})*$")
_LISTEN_FORM = "expected HOST:PORT (an IPv4 address or host name, or [IPv6]; 0.0.0.0: every one)"


def parse_listen_address(spec: str) -> tuple[str, int]:
    """--metrics: 'HOST:PORT' or '[IPv6]:PORT' -> (host, port); the host is an IPv4 or
    IPv6 address (as written, brackets off) or a host name, resolved when bound."""
    bracketed = re.match(r"^\[([^\]]*)\]:([^:]*)$", spec)
    host, sep, port_s = bracketed.group(1, 0, 2) if bracketed else spec.rpartition(":")
    if bracketed:
        if not _is_ip(host, 6):
            raise UsageError(f"bad --metrics '{spec}': [{host}] is no IPv6 address")
    elif "[" in spec or ":" in host:
        raise UsageError(f"bad --metrics '{spec}': an IPv6 address goes in brackets: [::1]:PORT")
    elif not sep or not _HOSTNAME.match(host) or _bad_dotted(host):
        raise UsageError(f"bad --metrics '{spec}': {_LISTEN_FORM}")
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise UsageError(f"bad --metrics port '{port_s}': expected 1-65535")
    return host, int(port_s)


def _bad_dotted(host: str) -> bool:
    """Digits and dots but no IPv4 address ('1.2.3' would resolve as 1.2.0.3)."""
    return host.replace(".", "").isdigit() and not _is_ip(host, 4)


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False
