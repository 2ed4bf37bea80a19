"""Topology snapshot: names and explains the (netns inode, ifindex) pairs that BPF events carry.

model    -- the immutable records (Interface, Namespace, Topology) and their dict round trip
netns    -- finding namespaces (resolve_netns, list_netns)
natrules -- picking a Service's rules out of iptables-save / nft text (pure)
collect  -- snapshot(): reading links, sysctls and rules inside each namespace
"""

from __future__ import annotations

from tracer.topology.collect import snapshot
from tracer.topology.model import SYSCTL_KEYS, Interface, Namespace, Topology
from tracer.topology.natrules import filter_iptables_save, filter_nft_ruleset
from tracer.topology.netns import NetnsRef, list_netns, resolve_netns

__all__ = [
    "SYSCTL_KEYS",
    "Interface",
    "Namespace",
    "NetnsRef",
    "Topology",
    "filter_iptables_save",
    "filter_nft_ruleset",
    "list_netns",
    "resolve_netns",
    "snapshot",
]
