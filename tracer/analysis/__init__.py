"""Pure reassembly and diagnosis over events plus a topology snapshot.

There is one analysis engine, tracer.analysis.stream.StreamAnalyser: the live
trace, replay, diff and the tests all feed it. analyse() is that engine fed
from a list of Event objects (encoded back into records first).
"""

from __future__ import annotations

from tracer.analysis.context import Context
from tracer.analysis.diagnose import Diagnosis
from tracer.analysis.reassemble import Connection
from tracer.analysis.stream import analyse_stream
from tracer.events.codec import encode
from tracer.events.model import Event
from tracer.events.rows import CODEC, rows_of


def analyse(events: list[Event], ctx: Context, **limits: int) -> list[tuple[Connection, Diagnosis]]:
    """Every connection of the service in the events, each with its diagnosis, in the
    order the engine judged them (the report's order)."""
    rows = rows_of(b"".join(map(encode, events)))
    return analyse_stream([rows], ctx, CODEC, **limits)
