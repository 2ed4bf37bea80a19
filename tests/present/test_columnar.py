"""Report entries written from event columns are character for character the ones
written from Connection objects, on every recorded connection (broken ones included:
packets, hops, NAT, drops, conntrack entries and reset links all go through)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tracer.analysis.finalize import Finalizer, LazyConnection
from tracer.analysis.stream import StreamAnalyser
from tracer.events.rows import CODEC, rows_of
from tracer.present.columnar import ColumnarWriter
from tracer.present.jsontext import dumps_indented
from tracer.present.report import connection_dict
from tracer.session import replay

FAULTS = Path(__file__).resolve().parent.parent / "fixtures" / "faults"


@pytest.mark.parametrize("name", sorted(p.name for p in FAULTS.glob("*.hts")))
def test_entries_from_columns_are_the_entries_from_objects(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    judged = Finalizer._healthy

    def every_one_lazy(self, closing, d, seg, starts):  # type: ignore[no-untyped-def]
        healthy, backend_at = judged(self, closing, d, seg, starts)
        return np.ones_like(healthy), backend_at

    res = replay(FAULTS / name)
    if all(c.proto == "udp" or any(p.role == "ICMP" for p in c.packets) for c, _d in res.results):
        # the column writer is the healthy-TCP fast path: UDP flows and connections with
        # ICMP errors never take it
        analyser = StreamAnalyser(res.context, CODEC)
        done = analyser.feed(rows_of(b"".join(res.records))) + analyser.finish()
        assert done and not any(isinstance(f.conn, LazyConnection) for f in done)
        return
    monkeypatch.setattr(Finalizer, "_healthy", every_one_lazy)
    analyser = StreamAnalyser(res.context, CODEC)
    done = analyser.feed(rows_of(b"".join(res.records))) + analyser.finish()
    assert len(done) == len(res.results)
    writer = ColumnarWriter()
    for f in done:
        assert isinstance(f.conn, LazyConnection) and not f.conn.built
        diag = next(d for c, d in res.results if c.key == f.conn.key)  # the real verdict
        fast = {nl: writer.entry(f.conn, diag, res.run.start_ns, nl) for nl in ("\n", "\n    ")}
        slow = dumps_indented(connection_dict(f.conn, diag, res.run.start_ns))
        assert f.conn.built
        for nl, text in fast.items():
            assert text == slow.replace("\n", nl)


def test_pods_are_named_alike_by_both_writers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14.2: with the pods of the snapshot's namespaces known (as the CNI cache
    gives them), the client, the backend and each hop carry their pod, and host-side
    veths the pod they lead to, in both writers alike."""
    from dataclasses import replace as dc_replace

    from tracer.analysis.context import TopologyNames
    from tracer.topology.model import Topology

    res = replay(FAULTS / "none.hts")
    topo = res.context.names.topology
    pods = {ns.inode: f"prod/{ns.name}" for ns in topo.namespaces if ns.name.count("-") == 2}
    assert len(pods) >= 2, "the client's and the backend's namespaces"
    named = Topology(
        tuple(dc_replace(ns, pod=pods.get(ns.inode)) for ns in topo.namespaces), topo.taken_at
    )
    ctx = dc_replace(res.context, names=TopologyNames(named))
    client_pod = next(pods[ns.inode] for ns in topo.namespaces if ns.name.endswith("-a"))
    judged = Finalizer._healthy

    def every_one_lazy(self, closing, d, seg, starts):  # type: ignore[no-untyped-def]
        healthy, backend_at = judged(self, closing, d, seg, starts)
        return np.ones_like(healthy), backend_at

    monkeypatch.setattr(Finalizer, "_healthy", every_one_lazy)
    analyser = StreamAnalyser(ctx, CODEC)
    done = analyser.feed(rows_of(b"".join(res.records))) + analyser.finish()
    assert done
    writer = ColumnarWriter()
    for f in done:
        assert isinstance(f.conn, LazyConnection)
        diag = next(d for c, d in res.results if c.key == f.conn.key)
        fast = writer.entry(f.conn, diag, res.run.start_ns, "\n")
        entry = connection_dict(f.conn, diag, res.run.start_ns)
        assert fast == dumps_indented(entry)
        assert entry["client"]["pod"] == client_pod
        assert entry["backend"]["pod"] is not None
        hops = [h for p in entry["packets"] for h in p["hops"]]
        assert {h["pod"] for h in hops if h["netns"].count("-") == 2} <= set(pods.values())
        assert any(h["pod"] for h in hops) and any(h["pod"] is None for h in hops), "node: none"
        veths = [h for h in hops if h["pod"] is None and h["dev"].startswith("veth")]
        assert veths and all(h["dev_pod"] in pods.values() for h in veths), "the pod behind"
