"""A minimal reader of BTF (BPF Type Format) blobs.

Enough for three uses: names of kernel enums (drop reasons differ between
kernel versions, so they are read from the running kernel, never from a
table), whether a type or function exists (feature probes), and struct
member offsets (the test that checks Python's mirror of struct ht_event).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from tracer.errors import HairtraceError

BTF_MAGIC = 0xEB9F
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_ENUM64 = 13, 14, 15, 17, 19
KIND_FUNC = 12
VMLINUX = Path("/sys/kernel/btf/vmlinux")


def kernel_btf_path() -> Path:
    """The running kernel's BTF; HAIRTRACE_KERNEL_BTF points elsewhere (tests, external BTF)."""
    return Path(os.environ.get("HAIRTRACE_KERNEL_BTF", VMLINUX))


# bytes that follow struct btf_type, per member (vlen) and fixed, by kind
_PER_MEMBER = {
    KIND_STRUCT: 12,
    KIND_UNION: 12,
    KIND_ENUM: 8,
    KIND_FUNC_PROTO: 8,
    KIND_DATASEC: 12,
    KIND_ENUM64: 12,
}
_FIXED = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}


@dataclass(frozen=True)
class BtfType:
    id: int
    kind: int
    name: str
    size_or_type: int
    members: tuple[tuple[str, int, int], ...]  # (name, type id or value, bit offset)


class Btf:
    """Parsed types of one BTF blob (a kernel's or an object's .BTF section)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise HairtraceError("BTF data too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data)
        if magic != BTF_MAGIC:
            raise HairtraceError("not BTF data (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strs = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self.types: list[BtfType] = []
        self._parse(data[hdr_len + type_off : hdr_len + type_off + type_len])

    def _str(self, off: int) -> str:
        end = self._strs.find(b"\0", off)
        return self._strs[off:end].decode(errors="replace")

    def _parse(self, blob: bytes) -> None:
        pos, tid = 0, 1
        while pos + 12 <= len(blob):
            name_off, info, size = struct.unpack_from("<III", blob, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            pos += 12
            members: list[tuple[str, int, int]] = []
            if kind in (KIND_STRUCT, KIND_UNION):
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", blob, pos + 12 * i)
                    bit_off = m_off & 0xFFFFFF if info & 0x80000000 else m_off
                    members.append((self._str(m_name), m_type, bit_off))
            elif kind == KIND_ENUM:
                fmt = "<Ii" if info & 0x80000000 else "<II"  # kind_flag: signed
                for i in range(vlen):
                    e_name, e_val = struct.unpack_from(fmt, blob, pos + 8 * i)
                    members.append((self._str(e_name), e_val, 0))
            elif kind == KIND_DATASEC:
                for i in range(vlen):
                    v_type, v_off, _v_size = struct.unpack_from("<III", blob, pos + 12 * i)
                    members.append(("", v_type, v_off * 8))
            pos += _PER_MEMBER.get(kind, 0) * vlen + _FIXED.get(kind, 0)
            self.types.append(BtfType(tid, kind, self._str(name_off), size, tuple(members)))
            tid += 1

    def find(self, name: str, kind: int | None = None) -> BtfType | None:
        for t in self.types:
            if t.name == name and (kind is None or t.kind == kind):
                return t
        return None

    def by_id(self, tid: int) -> BtfType:
        return self.types[tid - 1]

    def enum_names(self, name: str, strip_prefix: str = "") -> dict[int, str]:
        t = self.find(name, KIND_ENUM)
        if t is None:
            return {}
        return {val: n.removeprefix(strip_prefix) for n, val, _ in t.members}


def kernel_enum(name: str, strip_prefix: str = "", path: Path | None = None) -> dict[int, str]:
    """One enum of the kernel's BTF without parsing every type (~10x faster than Btf())."""
    path = path or kernel_btf_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HairtraceError(f"kernel BTF not readable at {path}: {exc.strerror}") from exc
    magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data)
    if magic != BTF_MAGIC:
        raise HairtraceError(f"{path} is not BTF data (bad magic)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    strs = data[hdr_len + str_off : hdr_len + str_off + str_len]
    name_off = strs.find(b"\0" + name.encode() + b"\0") + 1
    if name_off == 0:
        return {}
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    unpack = struct.unpack_from
    while pos + 12 <= end:
        t_name, info = unpack("<II", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        pos += 12
        if kind == KIND_ENUM and t_name == name_off:
            out = {}
            # kind_flag set = signed enum; otherwise values are unsigned (0xffff0000 masks)
            fmt = "<Ii" if info & 0x80000000 else "<II"
            for i in range(vlen):
                e_name, e_val = unpack(fmt, data, pos + 8 * i)
                stop = strs.find(b"\0", e_name)
                out[e_val] = strs[e_name:stop].decode().removeprefix(strip_prefix)
            return out
        pos += _PER_MEMBER.get(kind, 0) * vlen + _FIXED.get(kind, 0)
    return {}


def load_vmlinux(path: Path | None = None) -> Btf:
    path = path or kernel_btf_path()
    try:
        return Btf(path.read_bytes())
    except OSError as exc:
        raise HairtraceError(f"kernel BTF not readable at {path}: {exc.strerror}") from exc


def object_btf(obj_path: Path) -> Btf:
    """The .BTF section of a BPF ELF object (64-bit little-endian)."""
    data = obj_path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise HairtraceError(f"{obj_path} is not an ELF object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_sec = sections[shstrndx]
    for sh_name, _t, _f, _a, off, size in sections:
        end = data.find(b"\0", str_sec[4] + sh_name)
        if data[str_sec[4] + sh_name : end] == b".BTF":
            return Btf(data[off : off + size])
    raise HairtraceError(f"{obj_path} has no .BTF section (build with clang -g)")
