"""Fuzzing the session reader: whatever the bytes, the only outcomes are a complete read,
a partial read with a warning, or one HairtraceError line. Never another exception.

Mutations of a valid session are held to more: a read without warning means the file
was not changed (every byte after the magic is under a checksum), and a partial read
yields a prefix of the recorded events.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fixtures.loader import load
from tests.session.helpers import fixture_footer, fixture_header, write_fixture
from tracer.errors import HairtraceError
from tracer.events.model import Event
from tracer.session import open_session
from tracer.session.format import Kind, chunk_head, preamble

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples every run: stable outcome counts
    suppress_health_check=[HealthCheck.too_slow],
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([-1, 2**64, 10**400])
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@functools.cache
def _valid(workdir: str) -> tuple[bytes, tuple[Event, ...]]:
    """A small finished session (7 event chunks) and its events."""
    path = Path(workdir) / "valid.hts"
    fx = write_fixture("seed-broken.json", path, batch=9, tiny=True)
    return path.read_bytes(), tuple(fx.events)


def _read(path: Path) -> tuple[str, list[Event]]:
    try:
        r = open_session(path)
        events = list(r.events())
    except HairtraceError as exc:
        assert "\n" not in str(exc)
        return "error", []
    return ("warning" if r.warnings else "ok"), events


def test_reader_never_fails_otherwise(tmp_path: Path) -> None:
    valid, events = _valid(str(tmp_path))
    path = tmp_path / "fuzz.hts"
    counts: Counter[str] = Counter()

    def check(data: bytes, family: str, mutated: bool) -> None:
        path.write_bytes(data)
        outcome, got = _read(path)
        counts[f"{family}:{outcome}"] += 1
        counts[outcome] += 1
        event(f"{family}: {outcome}")
        if mutated and outcome == "ok":
            assert data == valid and got == list(events)
        if mutated and outcome == "warning":
            assert got == list(events[: len(got)])

    @SETTINGS
    @given(st.binary(max_size=400), st.booleans())
    def random_bytes(junk: bytes, after_magic: bool) -> None:
        check((preamble() if after_magic else b"") + junk, "random", False)

    @SETTINGS
    @given(st.integers(0, len(valid)))
    def truncations(n: int) -> None:
        check(valid[:n], "cut", True)

    @SETTINGS
    @given(
        st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)), max_size=4),
        st.integers(0, 64),
    )
    def flips(changes: list[tuple[int, int]], cut_tail: int) -> None:
        data = bytearray(valid[: len(valid) - cut_tail])
        for at, xor in changes:
            if at < len(data):
                data[at] ^= xor
        check(bytes(data), "flip", True)

    fx = load("seed-broken.json")
    header, footer = fixture_header(fx).to_dict(), fixture_footer(fx).to_dict()

    @SETTINGS
    @given(
        st.sampled_from([None, *sorted(header)]), _JSON,
        st.sampled_from([None, *sorted(footer)]), _JSON,
        st.lists(st.tuples(st.sampled_from(list(Kind)), st.binary(max_size=300)), max_size=4),
    )  # fmt: skip
    def structured(hkey: str | None, hval: Any, fkey: str | None, fval: Any, chunks: Any) -> None:
        """Well-formed chunks (checksums right) holding a wrong JSON field and odd payloads."""
        h = {**header, hkey: hval} if hkey else header
        f = {**footer, fkey: fval} if fkey else footer
        parts = [preamble()]
        for kind, payload in [
            (Kind.HEADER, json.dumps(h).encode()),
            *chunks,
            (Kind.FOOTER, json.dumps(f).encode()),
        ]:
            parts += [chunk_head(kind, payload), payload]
        check(b"".join(parts), "structured", False)

    for fuzz in (random_bytes, truncations, flips, structured):
        fuzz()
    print("\nsession reader fuzz outcomes:", dict(sorted(counts.items())))
    assert counts["ok"] and counts["warning"] and counts["error"], counts
    for family in ("cut", "flip"):
        assert counts[f"{family}:warning"] and counts[f"{family}:error"], counts
