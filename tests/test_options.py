from __future__ import annotations

import pytest

from tracer.errors import UsageError
from tracer.options import parse_service, parse_service_spec


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
