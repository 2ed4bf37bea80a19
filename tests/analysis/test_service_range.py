"""`--svc CIDR` in the analysis, the report and the session header (issue 15.2): every
recorded fault re-analysed as a trace of the lab's whole range gets the verdicts and
causes it gets as a trace of its one Service, each connection tagged with its Service."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tracer.analysis.context import Context
from tracer.analysis.stream import analyse_stream
from tracer.events.rows import CODEC, rows_of
from tracer.lab.faults import FAULTS
from tracer.present.report import build
from tracer.session import replay
from tracer.session.header import SessionHeader
from tracer.topology.model import ServiceEntry
from tracer.topology.services import range_addresses

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "faults"
NAMES = sorted(FAULTS)


# the lab's Service addresses, as its kube-proxy rules have them (the fixtures were
# recorded before snapshots kept the rules' entries)
LAB_SERVICES = frozenset({"100.67.30.133", "100.67.30.140"})


def _as_range(
    ctx: Context, net: str, prefix: int, addresses: frozenset[str] | None = None
) -> Context:
    return replace(ctx, service_ip=net, service_prefix=prefix, service_port=0,
                   service_addresses=addresses)  # fmt: skip


def _verdicts(results: list) -> list[tuple]:  # type: ignore[type-arg]
    return [
        (c.key, c.proto, d.verdict, d.brk.cause if d.brk else None, d.brk.where if d.brk else None)
        for c, d in results
    ]


@pytest.mark.parametrize("name", NAMES)
def test_a_range_judges_every_fault_as_its_one_service(name: str) -> None:
    """/10 holds the pods too (its Services known from the rules), /24 only Services."""
    res = replay(FIXTURES / f"{name}.hts")
    records = rows_of(b"".join(res.records))
    for net, prefix, addresses in (("100.64.0.0", 10, LAB_SERVICES), ("100.67.30.0", 24, None)):
        ctx = _as_range(res.context, net, prefix, addresses)
        ranged = analyse_stream([records], ctx, CODEC)
        assert _verdicts(ranged) == _verdicts(res.results), (name, prefix)


def test_a_range_without_the_service_sees_nothing() -> None:
    res = replay(FIXTURES / "bridge-nf-off.hts")
    records = rows_of(b"".join(res.records))
    ctx = _as_range(res.context, "10.96.0.0", 12)
    assert analyse_stream([records], ctx, CODEC) == []
    assert res.results, "the /32 trace has connections"


def test_two_services_are_tallied_apart_with_their_names() -> None:
    """The broken export connections and the dns flows of two recordings, reported as one
    range trace: per-connection service with name, and the per-Service tally."""
    export = replay(FIXTURES / "bridge-nf-off.hts")
    dns = replay(FIXTURES / "dns.hts")
    names = {("100.67.30.133", 80, "tcp"): "prod/export",
             ("100.67.30.140", 53, "udp"): "kube-system/kube-dns"}  # fmt: skip
    run = replace(export.run, service_ip="100.64.0.0", service_port=0, service_prefix=10,
                  service_names=names)  # fmt: skip
    report = json.loads(json.dumps(build(run, export.results + dns.results)))
    assert report["service"]["prefix_len"] == 10
    by = {(s["ip"], s["port"], s["proto"]): s for s in report["services"]}
    want_export = sum(1 for c, _d in export.results if c.key.dst == "100.67.30.133")
    assert want_export and by[("100.67.30.133", 80, "tcp")]["connections"] == want_export
    e = by[("100.67.30.133", 80, "tcp")]
    assert e["name"] == "prod/export" and e["broken"] == sum(
        d.verdict == "broken" for _c, d in export.results
    )
    assert e["causes"] == {"bridge-nf-call-iptables-off": e["broken"]}
    d = by[("100.67.30.140", 53, "udp")]
    assert d["name"] == "kube-system/kube-dns" and d["ok"] == len(dns.results) and not d["broken"]
    for c in report["connections"]:
        svc = c["service"]
        assert svc["name"] == names[(svc["ip"], svc["port"], c["proto"])]
    single = build(export.run, export.results)
    assert single["service"]["prefix_len"] == 32
    assert [s["ip"] for s in single["services"]] == ["100.67.30.133"]


def test_the_header_keeps_the_prefix_and_old_ones_read_as_32() -> None:
    header = replay(FIXTURES / "bridge-nf-off.hts").header
    ranged = replace(header, service_ip="100.64.0.0", service_prefix=10)
    assert SessionHeader.from_dict(ranged.to_dict()).service_prefix == 10
    old = header.to_dict()
    old.pop("service_prefix")
    assert SessionHeader.from_dict(old).service_prefix == 32
    assert SessionHeader.from_dict(old) == header


def test_the_range_s_services_come_from_the_node_s_rules() -> None:
    res = replay(FIXTURES / "bridge-nf-off.hts")
    topo, node = res.header.topology, res.header.netns_inode
    assert range_addresses(topo, node, "100.64.0.0", 10) is None, "no rules known: all"
    entries = (ServiceEntry("100.67.30.133", 80, "tcp", "prod/export"),
               ServiceEntry("10.96.0.10", 53, "udp", "kube-system/kube-dns"))  # fmt: skip
    ns = replace(topo.namespace(node), service_entries=entries)
    topo = replace(topo, namespaces=tuple(ns if n.inode == node else n for n in topo.namespaces))
    assert range_addresses(topo, node, "100.64.0.0", 10) == {"100.67.30.133"}
    assert range_addresses(topo, node, "100.67.30.133", 32) is None, "one address: no set"
    assert range_addresses(topo, node, "172.16.0.0", 12) is None, "none in it: the range"
