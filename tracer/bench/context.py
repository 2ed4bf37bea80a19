"""What every section of one bench run shares: mode, processes, helpers, the lab's traffic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tracer.bench.procs import Procs, Tools
from tracer.bench.traffic import Traffic


class StopRequest:
    """Set by the signal handler. The handler also raises KeyboardInterrupt, but one raised
    inside a ctypes callback (libbpf's ring-buffer reader) is swallowed: loops check this."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@dataclass
class Env:
    short: bool
    procs: Procs
    tools: Tools
    traffic: Traffic
    workdir: Path  # a temporary directory, removed at the end
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def seconds(self) -> float:
        """Length of one traffic sample."""
        return 1.0 if self.short else 3.0

    @property
    def rounds(self) -> int:
        """Interleaved (without, with) pairs per comparison: the lab's rates drift."""
        return 1 if self.short else 3
