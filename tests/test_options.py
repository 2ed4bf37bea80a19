from __future__ import annotations

import pytest

from tracer.errors import UsageError
from tracer.options import ServiceTarget, parse_service, parse_service_spec, parse_service_target


@pytest.mark.parametrize(
    "spec,want",
    [
        ("100.67.30.133", ("100.67.30.133", 0)),
        ("100.67.30.133:80", ("100.67.30.133", 80)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ],
)
def test_good(spec: str, want: tuple[str, int]) -> None:
    assert parse_service(spec) == want


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("example.com", "expected an IPv4 address"),
        ("300.1.1.1", "expected an IPv4 address"),
        ("fd00::1", "only IPv4"),
        ("10.0.0.1:0", "1-65535"),
        ("10.0.0.1:70000", "1-65535"),
        ("10.0.0.1:http", "1-65535"),
        ("10.0.0.1:", "1-65535"),
    ],
)
def test_bad(spec: str, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        parse_service(spec)


@pytest.mark.parametrize(
    "spec,want",
    [
        ("10.96.0.10:53", ("10.96.0.10", 53, ("tcp", "udp"))),
        ("10.96.0.10:53/udp", ("10.96.0.10", 53, ("udp",))),
        ("10.96.0.10:53/TCP", ("10.96.0.10", 53, ("tcp",))),
        ("10.96.0.10/udp", ("10.96.0.10", 0, ("udp",))),
    ],
)
def test_protocol(spec: str, want: tuple[str, int, tuple[str, ...]]) -> None:
    assert parse_service_spec(spec) == want


@pytest.mark.parametrize("spec", ["10.96.0.10:53/sctp", "10.96.0.10:53/", "10.96.0.10/icmp"])
def test_bad_protocol(spec: str) -> None:
    with pytest.raises(UsageError, match="bad service protocol"):
        parse_service_spec(spec)
    with pytest.raises(UsageError):
        parse_service(spec)  # the form without a protocol (scripts/capture-fixture)


@pytest.mark.parametrize(
    "spec,want",
    [
        ("100.67.30.133", ServiceTarget("100.67.30.133", 0, ("tcp", "udp"))),
        ("10.96.0.10:53/udp", ServiceTarget("10.96.0.10", 53, ("udp",))),
        ("prod/export", ServiceTarget(None, 0, ("tcp", "udp"), "prod/export")),
        ("prod/export:80", ServiceTarget(None, 80, ("tcp", "udp"), "prod/export")),
        ("prod/export/tcp", ServiceTarget(None, 0, ("tcp",), "prod/export")),
        ("kube-system/kube-dns:dns", ServiceTarget(None, 0, ("tcp", "udp"), "kube-system/kube-dns", "dns")),
        ("kube-system/kube-dns:dns-tcp/TCP", ServiceTarget(None, 0, ("tcp",), "kube-system/kube-dns", "dns-tcp")),
        ("1prod/tcp", ServiceTarget(None, 0, ("tcp", "udp"), "1prod/tcp")),  # a Service named tcp
    ],
)  # fmt: skip
def test_a_service_by_address_or_by_name(spec: str, want: ServiceTarget) -> None:
    assert parse_service_target(spec) == want


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("export", "a name needs its namespace"),
        ("Prod/export", "expected an IPv4 address or NAMESPACE/NAME"),
        ("prod/export_1", "expected an IPv4 address or NAMESPACE/NAME"),
        ("prod/export:0", "1-65535"),
        ("prod/export:70000", "1-65535"),
        ("prod/export:-http", "1-65535 or a port name"),
        ("prod/export:a-very-long-port-name", "1-65535 or a port name"),
        ("prod/export/icmp", "bad service protocol 'icmp'"),
        ("10.0.0.1/icmp", "bad service protocol 'icmp'"),
        ("300.1.1.1", "expected an IPv4 address"),
        ("fd00::10", "only IPv4"),
    ],
)
def test_a_bad_service_by_name_is_a_usage_error(spec: str, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        parse_service_target(spec)


@pytest.mark.parametrize(
    "spec,want",
    [
        ("10.96.0.0/12", ServiceTarget("10.96.0.0", 0, ("tcp", "udp"), prefix=12)),
        ("100.64.0.0/10/udp", ServiceTarget("100.64.0.0", 0, ("udp",), prefix=10)),
        ("10.96.0.0/12/TCP", ServiceTarget("10.96.0.0", 0, ("tcp",), prefix=12)),
        ("10.96.0.10/32", ServiceTarget("10.96.0.10", 0, ("tcp", "udp"))),  # the address
        ("10.96.0.10/32/udp", ServiceTarget("10.96.0.10", 0, ("udp",))),
        ("10.96.0.10/tcp", ServiceTarget("10.96.0.10", 0, ("tcp",))),  # a protocol, as before
        ("10.96.0.10:53/udp", ServiceTarget("10.96.0.10", 53, ("udp",))),
    ],
)  # fmt: skip
def test_a_range_of_service_addresses(spec: str, want: ServiceTarget) -> None:
    assert parse_service_target(spec) == want


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("10.96.0.1/12", r"host bits set \(did you mean 10.96.0.0/12\?\)"),
        ("10.96.0.0:80/12", "a range takes no port"),
        ("10.96.0.0/33", "prefix length 1-32"),
        ("10.96.0.0/0", "prefix length 1-32"),
        ("10.96.0.0/12/icmp", "bad service protocol 'icmp'"),
        ("10.96.0.0/12/", "bad service protocol ''"),
        ("10.96.0/12", "expected an IPv4 address"),
    ],
)
def test_a_bad_range_is_a_usage_error(spec: str, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        parse_service_target(spec)
