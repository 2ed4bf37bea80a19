"""The Python mirror of struct ht_event against the compiled object's BTF, and decoding."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from tracer.analysis.model import POINTS, Point
from tracer.errors import HairtraceError
from tracer.kernel.btf import KIND_ENUM, KIND_STRUCT, object_btf
from tracer.kernel.events import EVENT_SIZE, LAYOUT, decode, decode_all


def test_layout_matches_the_compiled_object(bpf_object: Path) -> None:
    btf = object_btf(bpf_object)
    ev = btf.find("ht_event", KIND_STRUCT)
    assert ev is not None, "struct ht_event missing from the object's BTF"
    assert ev.size_or_type == EVENT_SIZE
    offsets = {name: bit // 8 for name, _t, bit in ev.members}
    assert offsets == {name: off for name, (off, _size) in LAYOUT.items()}


def test_point_numbers_match_the_header(bpf_object: Path) -> None:
    enum = object_btf(bpf_object).find("ht_point", KIND_ENUM)
    assert enum is not None
    header = {name.removeprefix("HT_PT_"): val for name, val, _ in enum.members}
    for point in Point:
        assert header[point.name] == point.value, point
    assert set(POINTS) == set(Point)
    in_header = {n for n, v in header.items() if 0 < v < header["MAX"]}
    assert in_header == {p.name for p in Point}, "header and Python points differ"


def test_config_struct_is_what_the_loader_writes(bpf_object: Path) -> None:
    cfg = object_btf(bpf_object).find("ht_config", KIND_STRUCT)
    assert cfg is not None and cfg.size_or_type == 8
    assert [(n, b // 8) for n, _t, b in cfg.members] == [
        ("svc_addr", 0),
        ("svc_port", 4),
        ("proto", 6),
        ("_pad", 7),
    ]


def _record(**kw: object) -> bytes:
    tup = struct.pack(
        "!4s4sHH", socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"), 1234, 80
    )
    ct = struct.pack(
        "!4s4sHH", socket.inet_aton("10.0.0.1"), socket.inet_aton("10.9.9.9"), 1234, 80
    )
    return struct.pack(
        "<QQQQIIHBBi12sIIHBBII12s12sIB3x16s",
        5,
        0xFFFF0001,
        0xDEAD,
        0,
        4026531840,
        7,
        int(kw.get("point", 6)),
        0,
        0x12,
        -99,
        tup,
        100,
        200,
        42,
        1,
        2,
        0x1A0,
        0,
        ct,
        ct[4:8] + ct[0:4] + ct[10:12] + ct[8:10],
        0,
        6,
        b"cni0",
    )


def test_decode_fields() -> None:
    ev = decode(_record())
    assert (ev.ts_ns, ev.netns, ev.ifindex, ev.dev) == (5, 4026531840, 7, "cni0")
    assert ev.point == Point.NF_PRE_NAT and ev.info.name == "nf:PREROUTING@dnat"
    assert str(ev.tuple) == "10.0.0.1:1234 -> 10.0.0.2:80"
    assert (ev.seq, ev.ack_seq, ev.ip_id, ev.tcp_flags, ev.nf_prio) == (100, 200, 42, 0x12, -99)
    assert ev.ct is not None and ev.ct.id == 0xDEAD and ev.ct.ctinfo == 2
    assert str(ev.ct.orig) == "10.0.0.1:1234 -> 10.9.9.9:80"
    assert str(ev.ct.reply) == "10.9.9.9:80 -> 10.0.0.1:1234"
    assert ev.ct.status_names == ["DST_NAT", "SRC_NAT_DONE", "DST_NAT_DONE"]


def test_short_record_is_an_error_not_silence() -> None:
    with pytest.raises(HairtraceError, match="do not match"):
        decode_all([_record()[:100]])


def test_drop_reason_names_come_from_the_kernel_btf() -> None:
    from tracer.kernel.btf import kernel_btf_path, kernel_enum, load_vmlinux

    if not kernel_btf_path().exists():
        pytest.skip("no kernel BTF on this machine")
    fast = kernel_enum("skb_drop_reason", "SKB_DROP_REASON_")
    assert fast == load_vmlinux().enum_names("skb_drop_reason", "SKB_DROP_REASON_")
    assert "NO_SOCKET" in fast.values() and "NETFILTER_DROP" in fast.values()
    assert kernel_enum("no_such_enum_xyz") == {}


def test_unsigned_enum_values_stay_unsigned() -> None:
    """enum skb_drop_reason has SUBSYS_MASK = 0xffff0000: not -65536."""
    from tracer.kernel.btf import kernel_btf_path, kernel_enum

    if not kernel_btf_path().exists():
        pytest.skip("no kernel BTF on this machine")
    names = kernel_enum("skb_drop_reason", "SKB_DROP_REASON_")
    assert min(names) >= 0
    assert names.get(0xFFFF0000) in (None, "SUBSYS_MASK")
