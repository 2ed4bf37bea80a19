"""Connections counted per Service: what `--svc CIDR` (every Service of a range) shows.

A connection's Service is its conntrack original destination (Connection.key.dst and
dport) and protocol; its name is what the node's kube-proxy rules call that address,
port and protocol (RunInfo.service_names), None when they do not say.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.reassemble import Connection

ServiceKey = tuple[str, int, str]  # (ip, port, proto)
VERDICTS = ("ok", "broken", "recovered", "incomplete")


def service_key(conn: Connection) -> ServiceKey:
    return conn.key.dst, conn.key.dport, conn.proto


class ServiceTally:
    """Verdicts and causes of the connections added, per Service, in the order each
    Service was first seen."""

    def __init__(self) -> None:
        self._by: dict[ServiceKey, dict[str, Any]] = {}

    def add(self, conn: Connection, diag: Diagnosis) -> None:
        key = service_key(conn)
        row = self._by.get(key)
        if row is None:
            row = self._by[key] = {"connections": 0, "verdicts": {}, "causes": {}}
        row["connections"] += 1
        row["verdicts"][diag.verdict] = row["verdicts"].get(diag.verdict, 0) + 1
        if diag.brk is not None:
            cause = diag.brk.cause
            row["causes"][cause] = row["causes"].get(cause, 0) + 1

    def __len__(self) -> int:
        return len(self._by)

    def rows(self, names: Mapping[ServiceKey, str] | None = None) -> list[dict[str, Any]]:
        """The report's "services": one entry per Service seen, sorted by address, port
        and protocol; every verdict counted (ok, broken, recovered, incomplete: 0 when
        none) and the causes of the breaks."""
        out = []
        for key in sorted(self._by, key=_order):
            ip, port, proto = key
            row = self._by[key]
            verdicts: dict[str, int] = row["verdicts"]
            out.append({
                "ip": ip, "port": port, "proto": proto,
                "name": (names or {}).get(key),
                "connections": row["connections"],
                **{v: verdicts.get(v, 0) for v in VERDICTS},
                "causes": dict(sorted(row["causes"].items())),
            })  # fmt: skip
        return out


def _order(key: ServiceKey) -> tuple[int, int, str]:
    a, b, c, d = (int(x) if x.isdigit() else 0 for x in (key[0].split(".") + ["0"] * 4)[:4])
    return (a << 24) | (b << 16) | (c << 8) | d, key[1], key[2]


def service_text(key: ServiceKey, names: Mapping[ServiceKey, str] | None = None) -> str:
    """'prod/export 100.67.30.133:80/tcp', or the address alone when no name is known."""
    ip, port, proto = key
    name = (names or {}).get(key)
    return f"{name} {ip}:{port}/{proto}" if name else f"{ip}:{port}/{proto}"


def tally_text(row: dict[str, Any]) -> str:
    """'12 connection(s): 12 broken; causes: bridge-nf-call-iptables-off 12'"""
    verdicts = ", ".join(f"{row[v]} {v}" for v in VERDICTS if row[v])
    causes = ", ".join(f"{c} {n}" for c, n in row["causes"].items())
    return f"{row['connections']} connection(s): {verdicts}" + (
        f"; causes: {causes}" if causes else ""
    )
