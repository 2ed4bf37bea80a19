"""Pure reassembly and diagnosis over events plus a topology snapshot."""

from __future__ import annotations

from tracer.analysis.context import Context
from tracer.analysis.diagnose import Diagnosis, diagnose
from tracer.analysis.model import Event
from tracer.analysis.reassemble import Connection, reassemble


def analyse(events: list[Event], ctx: Context) -> list[tuple[Connection, Diagnosis]]:
    """Every connection of the service in the events, each with its diagnosis."""
    return [(c, diagnose(c, ctx)) for c in reassemble(events, ctx)]
