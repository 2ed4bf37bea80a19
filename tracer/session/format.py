"""Byte layout of a session file (format hairtrace/session@1): preamble, then chunks.

    preamble  8s magic b"\\x89HTSESS\\n" | u32 format version        (12 bytes)
    chunk     u32 payload length | u8 kind | 3x zero | u32 crc32(payload)
              | u32 crc32(the 12 bytes before)                        (16 bytes)
              payload

All integers little-endian. Chunk kinds: HEADER (JSON, always the first chunk),
EVENTS (struct ht_event records back to back, `record_size` bytes each, as the
ring buffer gave them), FOOTER (JSON), END (u64 offset of the FOOTER chunk,
always the last 24 bytes of a finished file). A reader skips kinds it does not
know, so new optional chunk kinds do not need a new format version.

The header has its own checksum, so a damaged length is told apart from a file
that was merely cut short.

Minor versions change nothing a reader of the same format version cannot read;
the header field `format_minor` says which (absent: 0). From version 1.1, records
carry per-trace ids (1, 2, 3, ... in order of first appearance, per field; 0 =
none) instead of kernel addresses in `skb`, `ct_id` and `location`
(tracer.kernel.pseudonyms), and the footer's optional `locations` names the
function of each drop location id. A reader gives records of older files the
same ids as it reads them, so nothing it returns holds a kernel address.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"\x89HTSESS\n"
FORMAT_VERSION = 1
FORMAT_NAME = f"hairtrace/session@{FORMAT_VERSION}"
# 1: per-trace ids instead of kernel addresses (see above); 2: the header's "protocols"
# (absent before: TCP only), UDP and ICMP-error records (struct ht_event's last pad
# bytes became inner_proto, icmp_type, icmp_code: zero in older records)
FORMAT_MINOR = 2
PREAMBLE = struct.Struct("<8sI")
CHUNK = struct.Struct("<IB3xII")
_HEAD = struct.Struct("<IB3xI")  # CHUNK without its own checksum
END_PAYLOAD = struct.Struct("<Q")
END_SIZE = CHUNK.size + END_PAYLOAD.size
MAX_PAYLOAD = 64 << 20  # a longer chunk is damage, not data: bounds a reader's memory


class Kind(IntEnum):
    """What a chunk holds."""

    HEADER = 1
    EVENTS = 2
    FOOTER = 3
    TOPOLOGY = 4  # reserved: a topology snapshot taken while recording
    END = 5


@dataclass(frozen=True)
class ChunkHead:
    """A chunk header whose own checksum held."""

    length: int
    kind: int
    crc: int


def preamble() -> bytes:
    return PREAMBLE.pack(MAGIC, FORMAT_VERSION)


def chunk_head(kind: Kind, payload: bytes | memoryview) -> bytes:
    """The 16-byte header of a chunk holding payload."""
    head = _HEAD.pack(len(payload), kind, zlib.crc32(payload))
    return head + zlib.crc32(head).to_bytes(4, "little")


def parse_head(raw: bytes) -> ChunkHead | None:
    """Decode 16 header bytes; None when they are damaged."""
    length, kind, crc, check = CHUNK.unpack(raw)
    if zlib.crc32(raw[:12]) != check:
        return None
    return ChunkHead(length, kind, crc)


def payload_ok(head: ChunkHead, payload: bytes) -> bool:
    return len(payload) == head.length and zlib.crc32(payload) == head.crc
