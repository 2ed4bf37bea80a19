"""Pods from libcni's result cache (tracer.topology.pods): the files in tests/fixtures/cni
are the ones Debian's containerd 1.6 (CRI plugin) wrote for the runtime lab's two pod
sandboxes (tracer.lab.runtime), copied as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tracer.topology.pods import parse_cache_entry, pods_by_inode, read_cache

CACHE = Path(__file__).resolve().parents[1] / "fixtures" / "cni"


def test_containerds_cache_entries_name_the_pod_its_netns_and_its_address() -> None:
    got = sorted(read_cache(CACHE), key=lambda a: a.pod)
    assert [a.pod for a in got] == ["prod/curl-5c8d9-q7x2p", "prod/export-7d9f5-x2k8q"]
    for att in got:
        assert att.netns_path.startswith("/var/run/netns/cni-")
        assert att.network == "hairtrace-pods" and att.ifname == "eth0"
        assert len(att.container_id) == 64
        assert len(att.ips) == 1 and att.ips[0].startswith("100.96.54.")
    assert {a.container_id for a in got} == {p.name.split("-")[2] for p in CACHE.iterdir()}


def test_entries_without_a_pod_name_or_of_another_kind_are_not_pods(tmp_path: Path) -> None:
    real = json.loads(next(CACHE.iterdir()).read_text())
    podman = {**real, "cniArgs": [["IgnoreUnknown", "1"], ["K8S_POD_NAME", "web"]]}
    assert parse_cache_entry(json.dumps(podman)) is None, "podman names containers, no namespace"
    assert parse_cache_entry(json.dumps({**real, "kind": "other"})) is None
    assert parse_cache_entry("not json") is None
    assert parse_cache_entry("[]") is None
    no_result = parse_cache_entry(json.dumps({**real, "result": None}))
    assert no_result is not None and (no_result.netns_path, no_result.ips) == ("", ())
    for name, text in (("a", json.dumps(real)), ("b", "{"), ("c", json.dumps(podman))):
        (tmp_path / name).write_text(text)
    os.mkdir(tmp_path / "d")  # not a file: skipped
    assert [a.pod for a in read_cache(tmp_path)] == [parse_cache_entry(json.dumps(real)).pod]
    assert read_cache(tmp_path / "missing") == []


def test_only_sandboxes_whose_netns_exists_map_to_an_inode() -> None:
    got = read_cache(CACHE)
    assert pods_by_inode(got) == {}, "the recorded sandboxes are gone"
    here = [type(a)(a.pod, "/proc/self/ns/net", a.ips, a.container_id, a.network, a.ifname)
            for a in got[:1]]  # fmt: skip
    assert pods_by_inode(here) == {os.stat("/proc/self/ns/net").st_ino: got[0].pod}
