"""Reading a session file: header and footer at once, events lazily one chunk at a time.

Memory stays bounded by one chunk (tracer.session.format.MAX_PAYLOAD). Damage
is one HairtraceError line naming the byte; a file cut off (a recorder killed,
a power loss) is not an error: it replays up to its last complete chunk and
says so in `warnings`.

Files older than format 1.1 hold raw kernel addresses in their records; payloads()
replaces them by per-trace ids as it reads (every way to the events goes through
it), so replay, export and reports of old files show none either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tracer.errors import HairtraceError, UsageError
from tracer.events.codec import decode_all
from tracer.events.model import Event
from tracer.kernel.pseudonyms import Pseudonyms, pseudonymised
from tracer.session.format import (
    CHUNK,
    END_PAYLOAD,
    END_SIZE,
    FORMAT_VERSION,
    MAGIC,
    MAX_PAYLOAD,
    PREAMBLE,
    ChunkHead,
    Kind,
    parse_head,
    payload_ok,
)
from tracer.session.header import SessionFooter, SessionHeader

_BLOCK = 1 << 20


def open_session(path: str | Path) -> SessionReader:
    """Open a session file: header and footer are read now, events when iterated."""
    return SessionReader(path)


class SessionReader:
    """One session file. footer is None when the recording did not finish."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.warnings: list[str] = []
        with self._open() as f:
            self.size = os.fstat(f.fileno()).st_size
            self.header, self._data_start = self._read_header(f)
            self.footer, self._data_end = self._find_end(f)

    # ------------------------------------------------------------------ events

    def record_batches(self) -> Iterator[list[bytes]]:
        """The raw 128-byte records, one list per chunk as they were recorded."""
        size = self.header.record_size
        for payload in self.payloads():
            yield [payload[i : i + size] for i in range(0, len(payload), size)]

    def payloads(self) -> Iterator[bytes]:
        """The records of each chunk back to back (header.record_size bytes each), as
        recorded: what numpy reads without copying (tracer.events.rows.rows_of).
        Kernel addresses of files older than format 1.1 are replaced by per-trace ids
        (the same ids on every pass: they follow the order of the file)."""
        size = self.header.record_size
        names = Pseudonyms() if self.header.format_minor < 1 else None
        with self._open() as f:
            pos = self._data_start
            f.seek(pos)
            while pos < self._data_end:
                head = _head(f.read(CHUNK.size))
                if head is None or pos + CHUNK.size + head.length > self._data_end:
                    raise self._corrupt(pos, "damaged chunk header")
                payload = f.read(head.length)
                if not payload_ok(head, payload):
                    raise self._corrupt(pos, "checksum mismatch")
                if head.kind == Kind.EVENTS:
                    if head.length % size:
                        raise self._corrupt(pos, f"not a whole number of {size}-byte records")
                    if payload:
                        yield payload if names is None else pseudonymised(payload, size, names)
                elif head.kind in (Kind.HEADER, Kind.FOOTER, Kind.END):
                    raise self._corrupt(pos, f"unexpected {Kind(head.kind).name.lower()} chunk")
                pos += CHUNK.size + head.length

    def event_batches(self) -> Iterator[list[Event]]:
        """Decoded events, one list per chunk."""
        for batch in self.record_batches():
            yield decode_all(batch)

    def events(self) -> Iterator[Event]:
        """Every event in recording order."""
        for batch in self.event_batches():
            yield from batch

    # -------------------------------------------------------------- structure

    def _open(self) -> IO[bytes]:
        try:
            return open(self.path, "rb")
        except FileNotFoundError:
            raise UsageError(f"session file {self.path} not found") from None
        except OSError as exc:
            raise HairtraceError(f"cannot read session file {self.path}: {exc.strerror}") from None

    def _corrupt(self, pos: int, why: str) -> HairtraceError:
        return HairtraceError(f"session file {self.path}: corrupt chunk at byte {pos} ({why})")

    def _read_header(self, f: IO[bytes]) -> tuple[SessionHeader, int]:
        """The header, and the offset of the first chunk after it."""
        if self.size == 0:
            raise HairtraceError(f"session file {self.path} is empty")
        pre = f.read(PREAMBLE.size)
        if not MAGIC.startswith(pre[: len(MAGIC)]):
            raise HairtraceError(f"{self.path} is not a hairtrace session file")
        cut = HairtraceError(f"session file {self.path} is cut off inside its header")
        if len(pre) < PREAMBLE.size:
            raise cut
        _magic, version = PREAMBLE.unpack(pre)
        if version > FORMAT_VERSION:
            raise HairtraceError(
                f"{self.path}: session format {version} is newer than this hairtrace "
                f"supports ({FORMAT_VERSION})"
            )
        if version < 1:
            raise HairtraceError(f"{self.path}: unknown session format {version}")
        raw = f.read(CHUNK.size)
        if len(raw) < CHUNK.size:
            raise cut
        head = _head(raw)
        if head is None or head.kind != Kind.HEADER:
            raise self._corrupt(PREAMBLE.size, "no valid header chunk")
        payload = f.read(head.length)
        if len(payload) < head.length:
            raise cut
        if not payload_ok(head, payload):
            raise self._corrupt(PREAMBLE.size, "checksum mismatch")
        header = SessionHeader.from_dict(_json(payload, "header"))
        return header, PREAMBLE.size + CHUNK.size + head.length

    def _find_end(self, f: IO[bytes]) -> tuple[SessionFooter | None, int]:
        """The footer and where the event chunks end: from the end marker, else by a scan."""
        found = self._from_end_marker(f)
        return found if found is not None else self._scan(f)

    def _from_end_marker(self, f: IO[bytes]) -> tuple[SessionFooter, int] | None:
        tail_at = self.size - END_SIZE
        if tail_at < self._data_start + CHUNK.size:
            return None
        f.seek(tail_at)
        raw = f.read(END_SIZE)
        head = _head(raw[: CHUNK.size])
        if head is None or head.kind != Kind.END or not payload_ok(head, raw[CHUNK.size :]):
            return None
        (at,) = END_PAYLOAD.unpack(raw[CHUNK.size :])
        if not self._data_start <= at <= tail_at - CHUNK.size:
            return None
        f.seek(at)
        head = _head(f.read(CHUNK.size))
        if head is None or head.kind != Kind.FOOTER or at + CHUNK.size + head.length != tail_at:
            return None
        payload = f.read(head.length)
        if not payload_ok(head, payload):
            return None
        return SessionFooter.from_dict(_json(payload, "footer")), at

    def _scan(self, f: IO[bytes]) -> tuple[SessionFooter | None, int]:
        """Walk the chunk headers (payloads skipped) to the end or to where the file was cut."""
        pos, footer_at, footer = self._data_start, 0, None
        while pos < self.size:
            f.seek(pos)
            raw = f.read(CHUNK.size)
            if len(raw) < CHUNK.size:
                self._cut(pos, "in a chunk header")
                break
            head = _head(raw)
            if head is None:
                if self._zeros_from(f, pos):
                    self._cut(pos, "in zero bytes left by a crash")
                    break
                raise self._corrupt(pos, "damaged chunk header")
            end = pos + CHUNK.size + head.length
            if end > self.size:
                self._cut(pos, "in a chunk")
                break
            payload = b""
            if head.kind in (Kind.FOOTER, Kind.END) or end == self.size:
                payload = f.read(head.length)
                if not payload_ok(head, payload):
                    if end == self.size:
                        self._cut(pos, "in its last chunk, which is damaged")
                        break
                    raise self._corrupt(pos, "checksum mismatch")
            if footer is not None and head.kind == Kind.END:
                if payload != END_PAYLOAD.pack(footer_at):
                    raise self._corrupt(pos, "end marker does not point at the footer")
                if end != self.size:
                    raise self._corrupt(end, "data after the end marker")
                return footer, footer_at
            if footer is not None:
                raise self._corrupt(pos, "data after the footer")
            if head.kind == Kind.HEADER or head.kind == Kind.END:
                raise self._corrupt(pos, f"unexpected {Kind(head.kind).name.lower()} chunk")
            if head.kind == Kind.FOOTER:
                footer, footer_at = SessionFooter.from_dict(_json(payload, "footer")), pos
            pos = end
        if footer is None:
            self.warnings.append(
                f"session file {self.path} has no footer (the recording did not finish): "
                "end time taken from the last event, event losses unknown"
            )
            return None, pos
        self.warnings.append(
            f"session file {self.path} ends after its footer without the end marker "
            "(cut off while closing)"
        )
        return footer, footer_at

    def _cut(self, pos: int, where: str) -> None:
        self.warnings.append(
            f"session file {self.path} is cut off at byte {pos} of {self.size} ({where}): "
            "replaying the chunks before it"
        )

    def _zeros_from(self, f: IO[bytes], pos: int) -> bool:
        f.seek(pos)
        while block := f.read(_BLOCK):
            if block.count(0) != len(block):
                return False
        return True


def _head(raw: bytes) -> ChunkHead | None:
    """A chunk header from 16 bytes: None when short, damaged or impossibly long."""
    if len(raw) < CHUNK.size:
        return None
    head = parse_head(raw)
    return head if head is not None and head.length <= MAX_PAYLOAD else None


def _json(payload: bytes, what: str) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise HairtraceError(f"bad session {what}: not JSON ({exc})".splitlines()[0]) from None
