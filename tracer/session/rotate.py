"""Rotating recordings (`--record FILE --record-rotate LIMIT --record-keep N`).

A trace that runs for days records into segments. The current segment is FILE; once it
passes the limit (a size, or how long it has been open) it is closed as a complete
session (its own footer), renamed FILE's stem + `.0001` + FILE's suffix (`run.hts` ->
`run.0001.hts`), and a new FILE starts with a fresh header. Each segment replays on its
own.

Of the closed segments, the newest `keep` are kept whatever they hold. An older one is
deleted, unless a connection judged other than ok (broken, recovered, incomplete) has
events in its time span: then it is kept for good. The decision waits until every
connection with events in the segment is judged (RotationPolicy.decide), so evidence
is never deleted before it is known to be evidence. `FILE-stem.segments.json` (the
index) says, at every change, which segments exist and why each one is kept.

RotationPolicy is the pure part (spans, verdicts, what the engine still holds open);
RotatingWriter does the files.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tracer.analysis.stream import StreamAnalyser
from tracer.errors import HairtraceError, UsageError
from tracer.events.codec import LAYOUT
from tracer.session.header import SessionFooter, SessionHeader
from tracer.session.writer import SessionWriter

if TYPE_CHECKING:
    from typing_extensions import Buffer

DEFAULT_KEEP = 3
SETTLE_EVERY_NS = 1_000_000_000
DELETED_SHOWN = 20  # deleted segments the index still lists (the latest ones)
MIN_BYTES = 4096
MIN_SECONDS = 1.0
INDEX_FORMAT = "hairtrace/segments@1"
_TS = slice(LAYOUT["ts_ns"][0], LAYOUT["ts_ns"][0] + 8)  # struct ht_event.ts_ns, u64
_SIZE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TIME = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_LIMIT = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]*)")


@dataclass(frozen=True)
class RotateLimit:
    """When a segment is full: at `bytes` of file, or `seconds` after it was opened."""

    text: str  # as given
    bytes: int | None = None
    seconds: float | None = None


def parse_limit(text: str) -> RotateLimit:
    """`500M`, `2G`, `64K`, `1048576` (bytes; K/M/G/T are powers of 1024, optionally with B
    or iB) or `90s`, `30m`, `6h`, `1d` (lower-case m: minutes). UsageError otherwise."""
    m = _LIMIT.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"--record-rotate {text!r}: not a size (500M, 2G) or a time (30m, 6h)")
    value, unit = float(m.group(1)), m.group(2)
    if unit in _TIME:
        if value < MIN_SECONDS:
            raise UsageError(f"--record-rotate {text}: at least {MIN_SECONDS:g}s")
        return RotateLimit(text, seconds=value * _TIME[unit])
    size = unit.lower().removesuffix("ib").removesuffix("b")
    if size not in _SIZE:
        raise UsageError(
            f"--record-rotate {text}: unknown unit {unit!r} (bytes: K, M, G; time: s, m, h, d)"
        )
    n = int(value * _SIZE[size])
    if n < MIN_BYTES:
        raise UsageError(f"--record-rotate {text}: at least {MIN_BYTES} bytes")
    return RotateLimit(text, bytes=n)


def check_keep(keep: int) -> int:
    if keep < 0:
        raise UsageError(f"--record-keep {keep}: must be 0 or more")
    return keep


def segment_path(path: Path, seq: int) -> Path:
    """Where closed segment seq of recording `path` goes: run.hts -> run.0001.hts."""
    return path.with_name(f"{path.stem}.{seq:04d}{path.suffix}")


def index_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.segments.json")


def existing(path: Path) -> list[Path]:
    """A previous recording's segments and index at path (not path itself)."""
    pattern = re.compile(re.escape(path.stem) + r"\.\d{4,}" + re.escape(path.suffix))
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p for p in parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        names = []
    idx = index_path(path)
    return sorted(names) + ([idx] if os.path.lexists(idx) else [])


@dataclass
class Segment:
    """One segment. first_ns/last_ns: the earliest and latest event time in it (None:
    no event); evidence: verdict -> connections judged so with events in its span."""

    seq: int
    opened_ns: int
    first_ns: int | None = None
    last_ns: int | None = None
    events: int = 0
    closed_ns: int | None = None
    evidence: dict[str, int] = field(default_factory=dict)
    state: str = "current"  # current | closed (kept while in the window) | kept | deleted
    decided_ns: int | None = None
    file: str = ""
    bytes: int = 0

    def add_span(self, lo: int, hi: int, n: int) -> None:
        self.first_ns = lo if self.first_ns is None else min(self.first_ns, lo)
        self.last_ns = hi if self.last_ns is None else max(self.last_ns, hi)
        self.events += n

    def overlaps(self, first_ns: int, last_ns: int) -> bool:
        if self.first_ns is None or self.last_ns is None:
            return False
        return first_ns <= self.last_ns and self.first_ns <= last_ns

    def reason(self) -> str:
        if self.state == "kept":
            found = ", ".join(f"{n} {v}" for v, n in sorted(self.evidence.items()))
            return f"holds events of connections judged {found}"
        if self.state == "closed":
            return "one of the newest --record-keep segments"
        if self.state == "current":
            return "the current segment"
        return "ordinary traffic only"

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "file": self.file,
            "state": self.state,
            "why": self.reason(),
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "opened_ns": self.opened_ns,
            "closed_ns": self.closed_ns,
            "decided_ns": self.decided_ns,
            "events": self.events,
            "bytes": self.bytes,
            "evidence": dict(sorted(self.evidence.items())),
        }


class RotationPolicy:
    """Which closed segments to delete, and when. Pure: times are the session clock.

    A closed segment outside the newest `keep` is decided once every connection with
    events in it is judged: all its events were grouped by the engine and any that
    waited for their connection (up to idle_ns) has found it or was dropped
    (grouped_ns >= last_ns + idle_ns), and no connection still open started at or before
    its last event (oldest_open_ns > last_ns). Connections judged other than ok mark
    every segment their span overlaps (conservative: a span, not each event).
    """

    def __init__(self, keep: int, idle_ns: int) -> None:
        self.keep, self.idle_ns = keep, idle_ns
        self.segments: list[Segment] = []  # in order, the current one last
        self.deleted: list[Segment] = []  # the latest DELETED_SHOWN ones deleted
        self.deleted_total = 0

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    def open(self, opened_ns: int) -> Segment:
        seq = self.segments[-1].seq + 1 if self.segments else 1
        seg = Segment(seq, opened_ns)
        self.segments.append(seg)
        return seg

    def close_current(self, closed_ns: int) -> Segment:
        seg = self.current
        seg.state, seg.closed_ns = "closed", closed_ns
        return seg

    def judged(self, first_ns: int, last_ns: int, verdict: str) -> None:
        """A connection judged: its events are in segments written already."""
        if verdict == "ok":
            return
        for seg in self.segments:
            if seg.overlaps(first_ns, last_ns):
                seg.evidence[verdict] = seg.evidence.get(verdict, 0) + 1

    def due(self) -> list[Segment]:
        """Closed segments past the newest `keep`, not yet decided."""
        closed = [s for s in self.segments if s.closed_ns is not None]
        old = closed[: max(0, len(closed) - self.keep)]
        return [s for s in old if s.state == "closed"]

    def waiting(self, grouped_ns: int) -> list[Segment]:
        """Due segments whose events the engine has grouped and settled (idle_ns)."""
        return [
            s for s in self.due() if s.last_ns is None or grouped_ns >= s.last_ns + self.idle_ns
        ]

    def decide(self, grouped_ns: int, oldest_open_ns: int | None, now_ns: int) -> list[Segment]:
        """Decide what can be: state kept or deleted. oldest_open_ns: the earliest first
        event of the connections the engine still holds open (None: none open)."""
        out = []
        for seg in self.waiting(grouped_ns):
            held = seg.last_ns is not None and oldest_open_ns is not None
            if held and oldest_open_ns <= seg.last_ns:  # type: ignore[operator]
                continue  # a connection open now may have events in it
            seg.state = "kept" if seg.evidence else "deleted"
            seg.decided_ns = now_ns
            out.append(seg)
        gone = [s for s in out if s.state == "deleted"]
        if gone:
            self.segments = [s for s in self.segments if s.state != "deleted"]
            self.deleted = (self.deleted + gone)[-DELETED_SHOWN:]
            self.deleted_total += len(gone)
        return out

    def finish(self, now_ns: int) -> list[Segment]:
        """Every connection judged (the trace ended): decide every due segment."""
        return self.decide(1 << 63, None, now_ns)


def event_span(records: list[bytes] | Buffer, size: int) -> tuple[int, int, int] | None:
    """(earliest ts_ns, latest ts_ns, count) of a batch of raw records of `size` bytes."""
    data = b"".join(records) if isinstance(records, list) else memoryview(records).cast("B")
    raw = np.frombuffer(data, dtype=np.uint8)
    raw = raw[: len(raw) - len(raw) % size].reshape(-1, size)  # the writer checks the rest
    if not len(raw):
        return None
    ts = np.ascontiguousarray(raw[:, _TS]).view("<u8")[:, 0]  # struct ht_event.ts_ns
    return int(ts.min()), int(ts.max()), len(raw)


class RotatingWriter:
    """SessionWriter's interface over segments. header_at(seq, now_ns) makes a segment's
    header, footer_at(segment, now_ns) the footer of one closed by rotation; the last one
    gets close(footer) with its own event count, and last_footer(segment, footer) may
    make the rest of it the segment's own (losses); recording() is the `recording` entry
    of footers."""

    def __init__(
        self,
        path: str | Path,
        limit: RotateLimit,
        keep: int,
        idle_ns: int,
        header_at: Callable[[int, int], SessionHeader],
        footer_at: Callable[[Segment, int], SessionFooter],
        *,
        last_footer: Callable[[Segment, SessionFooter], SessionFooter] | None = None,
        overwrite: bool = False,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.path, self.limit = Path(path), limit
        self.policy = RotationPolicy(keep, idle_ns)
        self._header_at, self._footer_at, self._clock = header_at, footer_at, clock
        self._overwrite = overwrite
        self._last_footer = last_footer
        self._next_settle = 0
        self._final: dict[str, Any] | None = None  # recording() once closed
        self.events = 0  # of every segment
        self._writer = self._open()
        self.header = self._writer.header

    def _open(self) -> SessionWriter:
        now = self._clock()
        seg = self.policy.open(now)
        seg.file = self.path.name
        header = self._header_at(seg.seq, now)
        w = SessionWriter(self.path, header, overwrite=self._overwrite)
        self._overwrite = True  # FILE was renamed away: the next one takes its place
        return w

    @property
    def closed(self) -> bool:
        return self._writer.closed

    def write_records(self, records: list[bytes] | Buffer) -> None:
        self._writer.write_records(records)  # checks the records
        span = event_span(records, self.header.record_size)
        if span is None:
            return
        self.policy.current.add_span(*span)
        self.events += span[2]
        if self._full():
            self.rotate()

    def _full(self) -> bool:
        lim, w = self.limit, self._writer
        if lim.bytes is not None and w.size >= lim.bytes:
            return True
        age = self._clock() - self.policy.current.opened_ns
        return lim.seconds is not None and age >= lim.seconds * 1e9

    def rotate(self) -> None:
        """Close the current segment with its footer, rename it, open the next FILE."""
        now = self._clock()
        seg = self.policy.close_current(now)
        seg.bytes = self._writer.size
        target = segment_path(self.path, seg.seq)
        seg.file = target.name
        self._writer.close(self._footer_at(seg, now))
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise HairtraceError(f"renaming {self.path} to {target}: {exc.strerror}") from None
        self._writer = self._open()
        self._write_index()

    def judged(self, spans: Iterable[tuple[int, int, str]]) -> None:
        """Connections just judged: (first_ns, last_ns, verdict)."""
        for first_ns, last_ns, verdict in spans:
            self.policy.judged(first_ns, last_ns, verdict)

    def settle(self, engine: StreamAnalyser) -> None:
        """Decide what the live engine allows (at most every SETTLE_EVERY_NS): its
        watermark is how far it grouped events; its open connections are asked for
        (peek(), which judges the ones that grew) only when a segment waits for them."""
        now = self._clock()
        if now < self._next_settle:
            return
        self._next_settle = now + SETTLE_EVERY_NS
        if self.policy.waiting(engine.watermark):
            oldest = min((f.conn.first_ns for f in engine.peek()), default=None)
            self.decide(engine.watermark, oldest)

    def decide(self, grouped_ns: int, oldest_open_ns: int | None) -> None:
        self._apply(self.policy.decide(grouped_ns, oldest_open_ns, self._clock()))

    def _apply(self, decided: list[Segment]) -> None:
        """Delete the segments decided so (kept ones stay where they are)."""
        for seg in decided:
            if seg.state == "deleted":
                (self.path.parent / seg.file).unlink(missing_ok=True)
        if decided:
            self._write_index()

    def recording(self) -> dict[str, Any]:
        """What the footer and the index say about the segments (once closed: what they
        said then, the last segment's size before its footer)."""
        if self._final is not None:
            return self._final
        cur = self.policy.current
        cur.bytes = self._writer.size
        return {
            "rotate": self.limit.text,
            "keep": self.policy.keep,
            "current": self.path.name,
            "segments": [s.to_dict() for s in self.policy.segments],
            "deleted": self.policy.deleted_total,
            "deleted_latest": [s.to_dict() for s in self.policy.deleted],
        }

    def _write_index(self, recording: dict[str, Any] | None = None) -> None:
        idx = index_path(self.path)
        tmp = idx.with_name(idx.name + ".tmp")
        recording = recording if recording is not None else self.recording()
        text = json.dumps({"format": INDEX_FORMAT, **recording}, indent=2) + "\n"
        try:
            tmp.write_text(text)
            os.replace(tmp, idx)
        except OSError as exc:
            raise HairtraceError(f"writing {idx}: {exc.strerror}") from None

    def close(self, footer: SessionFooter | None = None) -> None:
        """The last segment: every connection is judged now, so every due segment is
        decided first and the footer (given with its `recording` entry left out) says
        what was kept."""
        if self._writer.closed:
            return
        if footer is None:  # the trace failed: keep everything, say what exists
            self._writer.close()
            self._write_index()
            return
        self._apply(self.policy.finish(self._clock()))
        seg = self.policy.current
        footer = replace(footer, events=seg.events)
        if self._last_footer is not None:
            footer = self._last_footer(seg, footer)
        recording = self.recording()  # the index says the same (the size before the footer)
        self._writer.close(replace(footer, recording=recording))
        self._write_index(recording)
        self._final = recording
