"""Validated user input: service address, port, durations."""

from __future__ import annotations

import ipaddress

from tracer.errors import UsageError

# TCP packets without SYN, FIN or RST, and UDP datagrams, emitted per tuple, probe point
# and device (struct ht_config.data_budget): the handshake's ACK and the first data of each
# direction, with room for a few retransmissions; a UDP flow's first 8 requests and
# replies. 0 emits every packet.
DEFAULT_DATA_BUDGET = 8


PROTOCOLS = ("tcp", "udp")  # what --svc traces without /PROTO


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
