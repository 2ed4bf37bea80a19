"""Which pod a network namespace belongs to, from what the node itself keeps.

A container runtime (containerd's CRI plugin, CRI-O) attaches a pod sandbox to the pod
network through libcni, passing the kubelet's `K8S_POD_NAMESPACE` and `K8S_POD_NAME` in
CNI_ARGS; libcni caches each attachment's config, args and result in
/var/lib/cni/results/NETWORK-CONTAINERID-IFNAME (JSON, kind "cniCacheV1"), and the
result's container-side interface names the sandbox's netns path. Read-only: nothing
here writes or asks the runtime anything; no API access.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracer.topology.netns import netns_inode

#: libcni's default cache directory (containerd, CRI-O, podman's CNI backend).
CNI_CACHE_DIR = Path("/var/lib/cni/results")
_MAX_FILE = 1 << 20  # a cache entry is a few kB; anything much bigger is not one


@dataclass(frozen=True)
class PodAttachment:
    """One pod's attachment to one CNI network, as libcni cached it."""

    pod: str  # namespace/name
    netns_path: str  # the sandbox's network namespace ("" when the result has none)
    ips: tuple[str, ...]  # its addresses, without prefix length
    container_id: str
    network: str
    ifname: str


def parse_cache_entry(text: str) -> PodAttachment | None:
    """The pod attachment of one cache file's text; None when it is no libcni cache entry
    or carries no pod name (a container that is no Kubernetes pod)."""
    try:
        d: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(d, dict) or d.get("kind") != "cniCacheV1":
        return None
    args = {str(k): str(v) for k, v in _pairs(d.get("cniArgs"))}
    ns, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
    if not ns or not name:
        return None
    result: dict[str, Any] = d["result"] if isinstance(d.get("result"), dict) else {}
    netns = ""
    for itf in result.get("interfaces") or ():
        if isinstance(itf, dict) and isinstance(itf.get("sandbox"), str) and itf["sandbox"]:
            netns = itf["sandbox"]
            break
    ips = tuple(
        str(ip["address"]).split("/")[0]
        for ip in result.get("ips") or ()
        if isinstance(ip, dict) and isinstance(ip.get("address"), str)
    )
    return PodAttachment(f"{ns}/{name}", netns, ips, str(d.get("containerId", "")),
                         str(d.get("networkName", "")), str(d.get("ifName", "")))  # fmt: skip


def _pairs(value: Any) -> Iterable[tuple[Any, Any]]:
    if not isinstance(value, list):
        return ()
    return (tuple(p) for p in value if isinstance(p, list) and len(p) == 2)


def read_cache(cache_dir: Path = CNI_CACHE_DIR) -> list[PodAttachment]:
    """Every pod attachment in libcni's cache ([] when there is none or it is unreadable)."""
    try:
        names = sorted(os.listdir(cache_dir))
    except OSError:
        return []
    out = []
    for name in names:
        try:
            with open(cache_dir / name, encoding="utf-8", errors="replace") as f:
                text = f.read(_MAX_FILE)
        except OSError:
            continue  # removed meanwhile (the pod went away), or not a file
        att = parse_cache_entry(text)
        if att is not None:
            out.append(att)
    return out


def pods_by_inode(attachments: Iterable[PodAttachment]) -> dict[int, str]:
    """netns inode -> pod, for the attachments whose netns still exists."""
    out: dict[int, str] = {}
    for att in attachments:
        if not att.netns_path:
            continue
        try:
            out.setdefault(netns_inode(att.netns_path), att.pod)
        except (OSError, ValueError):
            continue  # the sandbox is gone; its cache entry outlived it
    return out
