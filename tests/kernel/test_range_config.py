"""--svc CIDR in the kernel's configuration: the mask, and the Service addresses of the
range that kube-proxy's rules hold (the kernel traces those, not every address)."""

from __future__ import annotations

import socket

import pytest

from tracer import trace
from tracer.topology.model import ServiceEntry
from tracer.topology.netns import NetnsRef
from tracer.trace import TraceOptions, range_services, service_mask

NODE = NetnsRef(4026531840, "/proc/self/ns/net", "node")
ENTRIES = [
    ServiceEntry("10.96.0.10", 53, "udp", "kube-system/kube-dns", "dns"),
    ServiceEntry("10.96.0.10", 53, "tcp", "kube-system/kube-dns", "dns-tcp"),
    ServiceEntry("10.100.7.1", 80, "tcp", "prod/export"),
    ServiceEntry("192.168.5.5", 443, "tcp", "prod/lb", kind="external IP"),
]


@pytest.mark.parametrize(
    ("prefix", "mask"),
    [(32, "255.255.255.255"), (12, "255.240.0.0"), (10, "255.192.0.0"), (0, "0.0.0.0")],
)
def test_mask_of_a_prefix(prefix: int, mask: str) -> None:
    assert service_mask(prefix) == socket.inet_aton(mask)


def test_a_range_traces_the_services_its_rules_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "service_entries_of", lambda _path: ENTRIES)
    opts = range_services(TraceOptions("10.96.0.0", 0, service_prefix=12), NODE)
    # once each, in address order; the external IP outside the range is not one of them
    assert opts.service_set == ("10.96.0.10", "10.100.7.1")


def test_one_address_or_a_node_without_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "service_entries_of", lambda _path: ENTRIES)
    one = TraceOptions("10.96.0.10", 53)
    assert range_services(one, NODE) is one  # a single address needs no set
    monkeypatch.setattr(trace, "service_entries_of", lambda _path: [])
    bare = range_services(TraceOptions("10.96.0.0", 0, service_prefix=12), NODE)
    assert bare.service_set == ()  # no rules: every address of the range (svc_set 0)
