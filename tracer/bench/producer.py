"""The event producer process: calls getppid() at a paced rate (bpf/bench.bpf.c emits per call).

Run as `python -m tracer.bench.producer RATE DURATION PER_CALL`: waits for a
line on stdin, then for DURATION seconds makes RATE / PER_CALL getppid()
calls per second (as many as it can when that is more than one core does),
and prints {"calls": N, "seconds": S} as JSON. Kept import-light: it starts
once per measured rate.
"""

from __future__ import annotations

import json
import os
import sys
import time


def produce(rate: float, duration: float, per_call: int) -> tuple[int, float]:
    """(calls made, seconds taken). Catches up after a stall, never runs ahead."""
    calls_per_s = rate / per_call
    getppid, clock = os.getppid, time.perf_counter
    calls = 0
    t0 = clock()
    # One clock read per call: a call is tens of events (microseconds), so the
    # read costs little, and a producer that falls behind still stops on time.
    while (elapsed := clock() - t0) < duration:
        if calls < elapsed * calls_per_s + 1:
            getppid()
            calls += 1
    return calls, clock() - t0


def main(argv: list[str]) -> int:
    rate, duration, per_call = float(argv[0]), float(argv[1]), int(argv[2])
    sys.stdin.readline()
    calls, seconds = produce(rate, duration, per_call)
    print(json.dumps({"calls": calls, "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
