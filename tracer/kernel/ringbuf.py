"""Drain a BPF ring buffer map by reading its memory directly, in numpy batches.

libbpf's ring_buffer__poll calls back into Python once per record, which tops
out near 1.5M records/s. Here the map is mmapped the way libbpf does it
(tools/lib/bpf/ringbuf.c, ring_buffer__add) and the records are walked and
copied out in bulk:

    offset 0          consumer page (read-write): u64 consumer position
    offset page_size  producer page (read-only):  u64 producer position
    offset 2*page     data area (read-only), `data_size` bytes, mapped twice in
                      a row so that a record wrapping past the end is contiguous

Each record is an 8-byte header (u32 length with BUSY and DISCARD bits, u32
page offset) followed by the data, the whole rounded up to 8 bytes. Positions
only grow; `pos & (data_size - 1)` is the offset in the data area.

Memory ordering: the kernel publishes with release stores (producer position,
then the header's BUSY bit cleared by xchg) and reads our consumer position
with an acquire load. On x86-64 (TSO) plain loads are not reordered with other
loads and stores are not reordered with earlier loads, so reading producer
position -> header -> data, then storing the consumer position after the copy,
in program order needs no fences. Weakly ordered CPUs (arm64) would need
acquire/release barriers Python cannot issue; `open_reader` falls back there to
libbpf's own (callback) reader.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import select
from dataclasses import dataclass, field

import numpy as np

from tracer.errors import HairtraceError
from tracer.events.codec import EVENT_SIZE
from tracer.kernel.libbpf import Libbpf, RingBuffer

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
DIRECT_ARCHES = frozenset({"x86_64"})


def _round8(n: int) -> int:
    return (n + 7) & ~7


def _empty(record_size: int) -> np.ndarray:
    return np.empty((0, record_size), dtype=np.uint8)


@dataclass
class Walk:
    """What one walk over the ring found.

    records: committed records of exactly `record_size` bytes, copied out, in
    ring order, as a C-contiguous (n, record_size) uint8 array.
    other_sizes: committed records of any other length (an object/tracer
    mismatch), copied out as bytes; their order relative to `records` is lost.
    """

    records: np.ndarray
    cons: int  # the consumer position after the last record walked
    discarded: int = 0
    other_sizes: list[bytes] = field(default_factory=list)


def walk(
    data: np.ndarray,
    cons: int,
    prod: int,
    mask: int,
    record_size: int = EVENT_SIZE,
    max_bytes: int | None = None,
) -> Walk:
    """Walk committed records from `cons` towards `prod` over a double-mapped data area.

    data: uint8 view of the data area mapped twice (2 * (mask + 1) bytes).
    Stops at the first BUSY record (reserved, not yet committed) and at `prod`;
    with max_bytes, at the first record boundary at or past cons + max_bytes. DISCARD
    records are skipped and counted. Runs of uniform records (header length ==
    record_size) are validated and copied vectorised; anything else is walked
    one record at a time.
    """
    stride = _round8(HDR_SIZE + record_size)
    limit = prod if max_bytes is None else min(prod, cons + max_bytes)
    chunks: list[np.ndarray] = []
    out = Walk(_empty(record_size), cons)
    pos = cons
    while pos < limit:
        off = pos & mask
        k = (limit - pos) // stride
        if k:
            # Never past `limit` <= prod, and prod - cons <= data_size, so the
            # block lies inside the double mapping.
            block = data[off : off + k * stride].reshape(k, stride)
            # A header changes only in its BUSY/DISCARD bits once reserved, so
            # a header caught mid-commit reads as busy (stop) or committed.
            lens = block[:, :4].view("<u4")[:, 0]
            bad = np.flatnonzero(lens != record_size)
            n = int(bad[0]) if len(bad) else k
            if n:
                chunks.append(block[:n, HDR_SIZE : HDR_SIZE + record_size])
                pos += n * stride
                if n == k:
                    continue
                off = pos & mask
        hdr = int(data[off : off + 4].view("<u4")[0])
        if hdr & BUSY_BIT:
            break
        length = hdr & ~(BUSY_BIT | DISCARD_BIT)
        if hdr & DISCARD_BIT:
            out.discarded += 1
        elif length == record_size:
            chunks.append(data[off + HDR_SIZE : off + HDR_SIZE + length].reshape(1, length))
        else:
            out.other_sizes.append(data[off + HDR_SIZE : off + HDR_SIZE + length].tobytes())
        pos += _round8(HDR_SIZE + length)
    # Copies, never views: the ring's memory is reused once the consumer moves on.
    if len(chunks) == 1:
        out.records = chunks[0].copy()
    elif chunks:
        out.records = np.concatenate(chunks)
    out.cons = pos
    return out


def records(arr: np.ndarray) -> list[bytes]:
    """A batch (n, record_size) as one bytes object per record."""
    if arr.ndim != 2 or not len(arr):
        return []
    raw, size = arr.tobytes(), arr.shape[1]
    return [raw[i : i + size] for i in range(0, len(raw), size)]


class DirectRingBuffer:
    """Reads a BPF_MAP_TYPE_RINGBUF map through its mmapped pages (x86-64 only).

    drain() returns the committed records as a (n, EVENT_SIZE) uint8 array
    (C-contiguous, owning its memory: raw bytes for recording as they are,
    `.view(events.EVENT_DTYPE)` for columns, events.decode_batch for Event
    objects); `events`, `nbytes` (headers and padding included) and
    `discarded` count what was drained so far.
    """

    def __init__(self, map_fd: int, data_size: int, record_size: int = EVENT_SIZE) -> None:
        if platform.machine() not in DIRECT_ARCHES:
            raise HairtraceError(
                f"direct ring-buffer reading needs x86-64 memory ordering, not {platform.machine()}"
            )
        page = mmap.PAGESIZE
        if data_size < page or data_size & (data_size - 1):
            raise HairtraceError(f"ring buffer size {data_size}: not a power of two >= {page}")
        self.data_size, self.record_size = data_size, record_size
        self.mask = data_size - 1
        self.events = self.nbytes = self.discarded = 0
        self._cons_map: mmap.mmap | None = None
        self._prod_map: mmap.mmap | None = None
        self._epoll: select.epoll | None = None
        try:
            self._cons_map = mmap.mmap(
                map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            self._prod_map = mmap.mmap(
                map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
            self._epoll = select.epoll()
            self._epoll.register(map_fd, select.EPOLLIN)
        except OSError as exc:
            self.close()
            raise HairtraceError(f"mapping the ring buffer (fd {map_fd}): {exc}") from None
        # Aligned 8-byte loads and stores: the kernel never sees a torn position.
        self._cons = ctypes.c_uint64.from_buffer(self._cons_map, 0)
        self._prod = np.frombuffer(self._prod_map, dtype=np.uint64, count=1)
        self._data = np.frombuffer(self._prod_map, dtype=np.uint8, offset=page)

    def wait(self, timeout_ms: int) -> bool:
        """Block until the kernel wakes the reader or timeout_ms passes; True when woken.

        The BPF side wakes the reader only past a threshold of pending data, so
        callers drain after a timeout too.
        """
        if self._epoll is None:
            raise HairtraceError("ring buffer reader is closed")
        return bool(self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1))

    def drain(self, max_bytes: int | None = None) -> np.ndarray:
        """Copy out every committed record (up to about max_bytes) and release its space."""
        if self._prod_map is None:
            raise HairtraceError("ring buffer reader is closed")
        cons = self._cons.value
        prod = int(self._prod[0])
        if prod == cons:
            return _empty(self.record_size)
        found = walk(self._data, cons, prod, self.mask, self.record_size, max_bytes)
        if found.other_sizes:
            raise HairtraceError(
                f"ring-buffer record of {len(found.other_sizes[0])} bytes, expected "
                f"{self.record_size}: BPF object and tracer version do not match"
            )
        # The records are copies by now; only then may the kernel reuse their space.
        self._cons.value = found.cons
        self.events += len(found.records)
        self.nbytes += found.cons - cons
        self.discarded += found.discarded
        return found.records

    def close(self) -> None:
        """Unmap and stop waiting. Idempotent; earlier drained arrays stay valid."""
        # Views into the maps must go before the maps can close.
        for name in ("_cons", "_prod", "_data"):
            self.__dict__.pop(name, None)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for m in (self._cons_map, self._prod_map):
            if m is not None:
                m.close()
        self._cons_map = self._prod_map = None


class CallbackRingBuffer:
    """libbpf's per-record callback reader behind DirectRingBuffer's interface.

    For CPUs where the direct reader's ordering argument does not hold; about
    1.5M records/s at most.
    """

    def __init__(self, lib: Libbpf, map_fd: int, record_size: int = EVENT_SIZE) -> None:
        self.record_size = record_size
        self.events = self.nbytes = self.discarded = 0
        self._pending: list[bytes] = []
        self._rb: RingBuffer | None = RingBuffer(lib, map_fd, self._pending.extend)

    def wait(self, timeout_ms: int) -> bool:
        if self._rb is None:
            raise HairtraceError("ring buffer reader is closed")
        return self._rb.poll(timeout_ms) > 0 or bool(self._pending)

    def drain(self, max_bytes: int | None = None) -> np.ndarray:
        """Everything committed (libbpf has no byte budget: max_bytes is ignored)."""
        if self._rb is None:
            raise HairtraceError("ring buffer reader is closed")
        self._rb.poll(0)
        batch = self._pending[:]
        self._pending.clear()
        if not batch:
            return _empty(self.record_size)
        odd = next((r for r in batch if len(r) != self.record_size), None)
        if odd is not None:
            raise HairtraceError(
                f"ring-buffer record of {len(odd)} bytes, expected "
                f"{self.record_size}: BPF object and tracer version do not match"
            )
        raw = b"".join(batch)
        self.events += len(batch)
        self.nbytes += len(batch) * _round8(HDR_SIZE + self.record_size)
        return np.frombuffer(raw, dtype=np.uint8).reshape(len(batch), self.record_size).copy()

    def close(self) -> None:
        if self._rb is not None:
            self._rb.close()
            self._rb = None


RingReader = DirectRingBuffer | CallbackRingBuffer


def open_reader(lib: Libbpf, map_fd: int, data_size: int, direct: bool | None = None) -> RingReader:
    """The direct reader where it is safe (x86-64), libbpf's callback reader elsewhere."""
    if direct is None:
        direct = platform.machine() in DIRECT_ARCHES
    if direct:
        return DirectRingBuffer(map_fd, data_size)
    return CallbackRingBuffer(lib, map_fd)
