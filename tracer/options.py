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


def parse_service_target(spec: str) -> ServiceTarget:
    """--svc: 'IP[:PORT][/PROTO]' or 'NAMESPACE/NAME[:PORT|:PORTNAME][/PROTO]'."""
    head, slash, tail = spec.rpartition("/")
    if not slash and spec.count(":") <= 1 and _DNS_LABEL.match(spec.partition(":")[0]):
        raise UsageError(f"bad service '{spec}': {_NAME_FORM} (a name needs its namespace)")
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
