"""The ring-buffer readers against a real BPF ring buffer map, filled by a tiny program.

The program is a socket filter assembled here (no compiler needed) and run with
BPF_PROG_TEST_RUN, so the kernel writes exactly the records a test asks for:
`size` bytes each, the first 8 the time (bpf_ktime_get_ns), then a fixed pattern.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tracer.errors import HairtraceError
from tracer.kernel.libbpf import BPF_MAP_TYPE_RINGBUF, Libbpf
from tracer.kernel.ringbuf import DirectRingBuffer, RingReader, open_reader

pytestmark = pytest.mark.needs_bpf

BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_PROG_TEST_RUN = 0, 5, 10
BPF_PROG_TYPE_SOCKET_FILTER = 1
FN_KTIME_GET_NS, FN_RINGBUF_OUTPUT, FN_RINGBUF_RESERVE, FN_RINGBUF_DISCARD = 5, 130, 131, 133
RING = 4096  # the smallest ring: records wrap around it often
STRIDE = 136


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


def _ld_map(reg: int, map_fd: int) -> bytes:
    """r = map (BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD): two instructions."""
    return _insn(0x18, reg, 1, 0, map_fd) + _insn(0)


MOV_K, MOV_X, ADD_K, ST_DW, STX_DW, CALL, EXIT, JEQ_K = (
    0xB7, 0xBF, 0x07, 0x7A, 0x7B, 0x85, 0x95, 0x15,
)  # fmt: skip


def pattern(size: int) -> bytes:
    """What follows the time in every record of `size` bytes."""
    return b"".join(struct.pack("<q", 0x10203040 + j) for j in range(1, size // 8))


def output_prog(map_fd: int, size: int) -> bytes:
    """bpf_ringbuf_output() of `size` stack bytes: time, then pattern(size)."""
    code = b"".join(_insn(ST_DW, 10, 0, -size + 8 * j, 0x10203040 + j) for j in range(size // 8))
    code += _insn(CALL, imm=FN_KTIME_GET_NS) + _insn(STX_DW, 10, 0, -size)
    code += _ld_map(1, map_fd) + _insn(MOV_X, 2, 10) + _insn(ADD_K, 2, imm=-size)
    code += _insn(MOV_K, 3, imm=size) + _insn(MOV_K, 4, imm=0)
    return code + _insn(CALL, imm=FN_RINGBUF_OUTPUT) + _insn(MOV_K, 0) + _insn(EXIT)


def discard_prog(map_fd: int, size: int) -> bytes:
    """bpf_ringbuf_reserve() then bpf_ringbuf_discard(): a DISCARD record."""
    code = _ld_map(1, map_fd) + _insn(MOV_K, 2, imm=size) + _insn(MOV_K, 3, imm=0)
    code += _insn(CALL, imm=FN_RINGBUF_RESERVE) + _insn(JEQ_K, 0, off=3)
    code += _insn(MOV_X, 1, 0) + _insn(MOV_K, 2, imm=0) + _insn(CALL, imm=FN_RINGBUF_DISCARD)
    return code + _insn(MOV_K, 0) + _insn(EXIT)


@dataclass
class Kernel:
    lib: Libbpf
    map_fd: int
    fds: list[int]

    def _attr(self, size: int, fields: list[tuple[int, str, int]]) -> ctypes.Array[ctypes.c_char]:
        attr = ctypes.create_string_buffer(size)
        for off, fmt, val in fields:
            struct.pack_into(fmt, attr, off, val)
        return attr

    def prog(self, code: bytes) -> int:
        insns = ctypes.create_string_buffer(code, len(code))
        license_ = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(65536)
        attr = self._attr(
            128,
            [
                (0, "<I", BPF_PROG_TYPE_SOCKET_FILTER),
                (4, "<I", len(code) // 8),
                (8, "<Q", ctypes.addressof(insns)),
                (16, "<Q", ctypes.addressof(license_)),
                (24, "<I", 1),
                (28, "<I", len(log)),
                (32, "<Q", ctypes.addressof(log)),
            ],
        )
        fd = self.lib.bpf_syscall(BPF_PROG_LOAD, attr)
        assert fd >= 0, f"{os.strerror(-fd)}: {log.value.decode()}"
        self.fds.append(fd)
        return fd

    def run(self, prog_fd: int, times: int) -> None:
        packet = ctypes.create_string_buffer(64)
        attr = self._attr(
            80,
            [(0, "<I", prog_fd), (8, "<I", 64), (16, "<Q", ctypes.addressof(packet)),
             (32, "<I", times)],
        )  # fmt: skip
        ret = self.lib.bpf_syscall(BPF_PROG_TEST_RUN, attr)
        assert ret == 0, os.strerror(-ret)


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    lib = Libbpf()
    attr = ctypes.create_string_buffer(72)
    struct.pack_into("<IIII", attr, 0, BPF_MAP_TYPE_RINGBUF, 0, 0, RING)
    fd = lib.bpf_syscall(BPF_MAP_CREATE, attr)
    assert fd >= 0, f"creating a ring buffer map: {os.strerror(-fd)}"
    k = Kernel(lib, fd, [fd])
    yield k
    for fd in k.fds:
        os.close(fd)


@pytest.fixture(params=["direct", "callback"])
def reader(request: pytest.FixtureRequest, kernel: Kernel) -> Iterator[RingReader]:
    rb = open_reader(kernel.lib, kernel.map_fd, RING, direct=request.param == "direct")
    yield rb
    rb.close()


def _check(batch: np.ndarray, size: int = 128) -> list[int]:
    """The records' times, after checking the rest of each record."""
    assert batch.dtype == np.uint8 and batch.shape[1:] == (size,) and batch.flags.c_contiguous
    assert all(r[8:].tobytes() == pattern(size) for r in batch)
    return batch[:, :8].copy().view("<u8")[:, 0].tolist()


def test_records_written_by_the_kernel_come_out_whole_and_in_order(
    kernel: Kernel, reader: RingReader
) -> None:
    out = kernel.prog(output_prog(kernel.map_fd, 128))
    times: list[int] = []
    for _ in range(12):  # 12 x 20 records of 136 bytes go round a 4 KiB ring 8 times
        kernel.run(out, 20)
        times += _check(reader.drain())
    assert len(times) == 240 and times == sorted(times)
    assert reader.events == 240 and reader.nbytes == 240 * STRIDE
    assert len(reader.drain()) == 0


def test_a_full_ring_drops_until_the_consumer_moves_on(kernel: Kernel, reader: RingReader) -> None:
    """The kernel sees our consumer position: space comes back after each drain."""
    out = kernel.prog(output_prog(kernel.map_fd, 128))
    last = 0
    for _ in range(3):
        kernel.run(out, 40)  # only 30 fit in 4096 bytes
        times = _check(reader.drain())
        assert len(times) == RING // STRIDE and min(times) > last, "new records each time"
        last = max(times)


def test_discarded_records_are_skipped(kernel: Kernel, reader: RingReader) -> None:
    out = kernel.prog(output_prog(kernel.map_fd, 128))
    discard = kernel.prog(discard_prog(kernel.map_fd, 128))
    kernel.run(out, 3)
    kernel.run(discard, 2)
    kernel.run(out, 3)
    assert len(_check(reader.drain())) == 6
    if isinstance(reader, DirectRingBuffer):
        assert reader.discarded == 2


def test_a_record_of_another_size_is_an_error(kernel: Kernel, reader: RingReader) -> None:
    kernel.run(kernel.prog(output_prog(kernel.map_fd, 64)), 1)
    with pytest.raises(HairtraceError, match="do not match"):
        reader.drain()


def test_wait_wakes_on_data_and_times_out_without(kernel: Kernel, reader: RingReader) -> None:
    assert reader.wait(0) is False
    kernel.run(kernel.prog(output_prog(kernel.map_fd, 128)), 1)  # flags 0: wakes the reader
    assert reader.wait(2000) is True
    assert len(reader.drain()) == 1
    assert reader.wait(10) is False


def test_direct_reader_refuses_a_bad_size_and_closes_twice(kernel: Kernel) -> None:
    with pytest.raises(HairtraceError, match="power of two"):
        DirectRingBuffer(kernel.map_fd, 3000)
    rb = DirectRingBuffer(kernel.map_fd, RING)
    rb.close()
    rb.close()
    with pytest.raises(HairtraceError, match="closed"):
        rb.drain()
