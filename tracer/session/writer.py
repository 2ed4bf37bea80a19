"""Recording a session file: header, then batches of raw ring-buffer records, then footer.

Built to keep up with the tracer at its highest rate: a batch costs one join,
one checksum and one write(2) (the chunk header and payload go out together
through writev). Every chunk reaches the kernel at once, so a killed recorder
loses nothing written; data reaches the disk at least every `fsync_interval`
seconds and at close, so a power loss costs at most that much.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from tracer.errors import HairtraceError, UsageError
from tracer.session.format import END_PAYLOAD, Kind, chunk_head, preamble
from tracer.session.header import SessionFooter, SessionHeader

if TYPE_CHECKING:
    from typing_extensions import Buffer

FSYNC_INTERVAL = 5.0  # seconds
CHUNK_RECORDS = 65536  # a larger batch is split, so that a reader's chunks stay bounded


def check_target(path: str | Path, *, overwrite: bool = False) -> None:
    """Fail early (before tracing) when path exists and may not be overwritten."""
    if not overwrite and os.path.lexists(path):
        raise UsageError(f"session file {path} exists (use --force to overwrite)")


def _json(d: dict[str, object]) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


class SessionWriter:
    """Writes one session file. Use as a context manager, or call close(footer).

    Leaving the `with` block (or close() without a footer) ends the file without
    a footer: a reader then treats it as a recording that did not finish.
    """

    def __init__(
        self,
        path: str | Path,
        header: SessionHeader,
        *,
        overwrite: bool = False,
        fsync_interval: float = FSYNC_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.header = header
        self.events = 0  # records written so far
        self._fsync_interval, self._clock = fsync_interval, clock
        self._offset = 0
        self._fd: int | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_TRUNC if overwrite else os.O_EXCL
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            raise UsageError(
                f"session file {self.path} exists (use --force to overwrite)"
            ) from None
        except OSError as exc:
            raise HairtraceError(
                f"cannot create session file {self.path}: {exc.strerror}"
            ) from None
        try:
            payload = _json(header.to_dict())
            self._write(preamble(), chunk_head(Kind.HEADER, payload), payload)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)  # not a session file yet
            raise
        self._synced_at = clock()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def size(self) -> int:
        """Bytes written to the file so far."""
        return self._offset

    def _write(self, *parts: bytes | memoryview) -> None:
        """One writev(2) of parts (more only if the kernel took less than all)."""
        if self._fd is None:
            raise HairtraceError(f"session file {self.path} is already closed")
        total = sum(len(p) for p in parts)
        try:
            done = os.writev(self._fd, parts)
            if done < total:
                rest = memoryview(b"".join(parts))[done:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except OSError as exc:
            raise HairtraceError(f"writing session file {self.path}: {exc.strerror}") from None
        self._offset += total

    def write_records(self, records: list[bytes] | Buffer) -> None:
        """Append one batch of raw struct ht_event records as one chunk (split if huge).

        records: one bytes object per record, or the records back to back in one
        buffer (bytes, memoryview, a C-contiguous (n, record_size) uint8 array).
        """
        size = self.header.record_size
        if isinstance(records, list):
            payload: bytes | memoryview = b"".join(records)
            count = len(records)
        else:
            payload = memoryview(records).cast("B")
            count = -(-len(payload) // size)  # a partial record makes the check below fail
        if not count:
            return
        if len(payload) != count * size:
            raise HairtraceError(
                f"ring-buffer records are not all {size} bytes: "
                "BPF object and tracer version do not match"
            )
        view, step = memoryview(payload), CHUNK_RECORDS * size
        for start in range(0, len(payload), step):
            part = view[start : start + step]
            self._write(chunk_head(Kind.EVENTS, part), part)
        self.events += count
        if self._clock() - self._synced_at >= self._fsync_interval:
            self._sync()

    def _sync(self) -> None:
        assert self._fd is not None
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise HairtraceError(f"writing session file {self.path}: {exc.strerror}") from None
        self._synced_at = self._clock()

    def close(self, footer: SessionFooter | None = None) -> None:
        """Write the footer (when given) and the end marker, sync to disk, close. Idempotent."""
        if self._fd is None:
            return
        try:
            if footer is not None:
                payload = _json(footer.to_dict())
                end = END_PAYLOAD.pack(self._offset)
                self._write(
                    chunk_head(Kind.FOOTER, payload), payload, chunk_head(Kind.END, end), end
                )
            self._sync()
        finally:
            os.close(self._fd)
            self._fd = None
