from __future__ import annotations

import pytest

from tracer.present.live import compact_roles


@pytest.mark.parametrize(
    "roles,want",
    [
        (["SYN", "SYN+ACK", "RST"] * 3, "SYN SYN+ACK RST x3"),
        (["SYN", "SYN+ACK", "ACK", "DATA", "ACK"], "SYN SYN+ACK ACK DATA ACK"),
        (["SYN", "SYN", "SYN+ACK", "ACK"], "SYN x2 SYN+ACK ACK"),
        ([], ""),
    ],
)
def test_compact_roles(roles: list[str], want: str) -> None:
    assert compact_roles(roles) == want
