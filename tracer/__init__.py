"""hairtrace: live eBPF packet-path tracer for Kubernetes Service traffic on a node."""

from __future__ import annotations

__version__ = "0.1.0"
