"""The ring-buffer record walker over synthetic memory laid out as the kernel does it."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tracer.kernel.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, records, walk

SIZE = 4096  # data area; mapped twice in a row, like the kernel maps it
MASK = SIZE - 1
REC = 128
STRIDE = 136  # header + 128 bytes, rounded up to 8


class Ring:
    """A producer writing records the way kernel/bpf/ringbuf.c does, positions only growing."""

    def __init__(self, start: int = 0) -> None:
        self.area = bytearray(SIZE)
        self.prod = start

    def _put(self, pos: int, raw: bytes) -> None:
        for i, b in enumerate(raw):
            self.area[(pos + i) & MASK] = b

    def add(self, payload: bytes, bits: int = 0) -> bytes:
        self._put(self.prod, struct.pack("<II", len(payload) | bits, 0) + payload)
        self.prod += (HDR_SIZE + len(payload) + 7) & ~7
        return payload

    def data(self) -> np.ndarray:
        """The double mapping: the data area twice, back to back."""
        return np.frombuffer(bytes(self.area) * 2, dtype=np.uint8)


def payload(i: int, size: int = REC) -> bytes:
    return bytes((i + j) & 0xFF for j in range(size))


def test_uniform_records_come_out_as_one_array() -> None:
    ring = Ring()
    sent = [ring.add(payload(i)) for i in range(20)]
    got = walk(ring.data(), 0, ring.prod, MASK)
    assert got.records.shape == (20, REC) and got.records.flags.c_contiguous
    assert records(got.records) == sent
    assert got.cons == ring.prod == 20 * STRIDE
    assert got.discarded == 0 and got.other_sizes == []


def test_nothing_to_read() -> None:
    ring = Ring(start=5 * SIZE + 64)
    got = walk(ring.data(), ring.prod, ring.prod, MASK)
    assert got.records.shape == (0, REC) and got.cons == ring.prod


def test_discarded_records_are_skipped_and_counted() -> None:
    ring = Ring()
    a = ring.add(payload(1))
    ring.add(payload(2), DISCARD_BIT)
    ring.add(payload(3), DISCARD_BIT)
    b = ring.add(payload(4))
    got = walk(ring.data(), 0, ring.prod, MASK)
    assert records(got.records) == [a, b]
    assert got.discarded == 2 and got.cons == ring.prod


def test_a_busy_record_stops_the_walk_where_it_starts() -> None:
    ring = Ring()
    a = ring.add(payload(1))
    busy_at = ring.prod
    ring.add(payload(2), BUSY_BIT)  # reserved, not committed yet
    ring.add(payload(3))  # committed after it: must wait for it
    got = walk(ring.data(), 0, ring.prod, MASK)
    assert records(got.records) == [a]
    assert got.cons == busy_at
    # committed later: the next walk picks up from there, in order
    ring.area[busy_at & MASK : (busy_at & MASK) + 4] = struct.pack("<I", REC)
    again = walk(ring.data(), got.cons, ring.prod, MASK)
    assert records(again.records) == [payload(2), payload(3)]


def test_busy_and_discard_bits_together_still_mean_busy() -> None:
    ring = Ring()
    ring.add(payload(1), BUSY_BIT | DISCARD_BIT)
    got = walk(ring.data(), 0, ring.prod, MASK)
    assert len(got.records) == 0 and got.cons == 0 and got.discarded == 0


def test_records_wrapping_past_the_end_read_whole_through_the_double_mapping() -> None:
    start = 3 * SIZE - 2 * STRIDE - 40  # the third record straddles the end of the area
    ring = Ring(start)
    sent = [ring.add(payload(i)) for i in range(6)]
    assert any((p & MASK) + STRIDE > SIZE for p in range(start, ring.prod, STRIDE))
    got = walk(ring.data(), start, ring.prod, MASK)
    assert records(got.records) == sent and got.cons == ring.prod


def test_a_header_in_the_last_bytes_of_the_area() -> None:
    start = 2 * SIZE - HDR_SIZE  # the data starts at the beginning of the second mapping
    ring = Ring(start)
    sent = [ring.add(payload(i)) for i in range(3)]
    got = walk(ring.data(), start, ring.prod, MASK)
    assert records(got.records) == sent


def test_records_of_another_length_are_stepped_over_and_returned_apart() -> None:
    ring = Ring()
    a = ring.add(payload(1))
    odd = ring.add(payload(2, 61))  # rounded up to 72 bytes in the ring
    b = ring.add(payload(3))
    big = ring.add(payload(4, 200))
    c = ring.add(payload(5))
    got = walk(ring.data(), 0, ring.prod, MASK)
    assert records(got.records) == [a, b, c]
    assert got.other_sizes == [odd, big]
    assert got.cons == ring.prod == 3 * STRIDE + 72 + 208


def test_max_bytes_stops_after_the_record_that_reaches_it() -> None:
    ring = Ring()
    sent = [ring.add(payload(i)) for i in range(10)]
    first = walk(ring.data(), 0, ring.prod, MASK, max_bytes=3 * STRIDE + 1)
    assert records(first.records) == sent[:4]
    rest = walk(ring.data(), first.cons, ring.prod, MASK, max_bytes=10**9)
    assert records(rest.records) == sent[4:]
    assert rest.cons == ring.prod


def test_drained_records_do_not_alias_the_ring() -> None:
    ring = Ring()
    ring.add(payload(7))
    data = np.frombuffer(bytearray(bytes(ring.area) * 2), dtype=np.uint8)
    got = walk(data, 0, ring.prod, MASK)
    data[:] = 0  # the producer reuses the space once the consumer moved on
    assert got.records[0].tobytes() == payload(7)


@pytest.mark.parametrize("seed", range(5))
def test_random_mix_matches_a_reference_walk(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ring = Ring(int(rng.integers(0, 1 << 40)) & ~7)
    start = ring.prod
    want, other, discarded = [], [], 0
    while ring.prod - start < SIZE - 300:
        kind = rng.choice(["ok", "ok", "ok", "discard", "odd"])
        if kind == "ok":
            want.append(ring.add(payload(int(rng.integers(256)))))
        elif kind == "discard":
            ring.add(payload(0, int(rng.integers(1, 200))), DISCARD_BIT)
            discarded += 1
        else:
            other.append(ring.add(payload(1, int(rng.choice([1, 64, 127, 129, 160])))))
    got = walk(ring.data(), start, ring.prod, MASK)
    assert records(got.records) == want and got.other_sizes == other
    assert got.discarded == discarded and got.cons == ring.prod
