from __future__ import annotations

import pytest

from tracer.errors import UsageError
from tracer.options import parse_service


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
