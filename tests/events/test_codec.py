"""The Python mirror of struct ht_event against the compiled object's BTF, and decoding."""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tracer.errors import HairtraceError
from tracer.events.codec import (
    EVENT_DTYPE,
    EVENT_SIZE,
    LAYOUT,
    decode,
    decode_all,
    decode_batch,
    encode,
)
from tracer.events.model import POINTS, Point
from tracer.kernel.btf import KIND_ENUM, KIND_STRUCT, object_btf
from tracer.trace import TraceOptions, _config


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
    assert cfg is not None and cfg.size_or_type == 16
    assert [(n, b // 8) for n, _t, b in cfg.members] == [
        ("svc_addr", 0),
        ("svc_port", 4),
        ("protos", 6),
        ("data_budget", 7),
        ("svc_mask", 8),
        ("svc_set", 12),
        ("_pad", 13),
    ]
    opts = TraceOptions("10.96.0.0", 0, service_prefix=12, service_set=("10.96.0.10",))
    raw = _config(opts)
    assert len(raw) == cfg.size_or_type
    assert raw[8:12] == socket.inet_aton("255.240.0.0") and raw[12] == 1
    assert _config(replace(opts, service_prefix=32, service_set=()))[8:13] == b"\xff" * 4 + b"\0"


def _record(**kw: object) -> bytes:
    tup = struct.pack(
        "!4s4sHH", socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"), 1234, 80
    )
    ct = struct.pack(
        "!4s4sHH", socket.inet_aton("10.0.0.1"), socket.inet_aton("10.9.9.9"), 1234, 80
    )
    return struct.pack(
        "<QQQQIIHBBi12sIIHBBII12s12sIBBBB16s",
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
        int(kw.get("proto", 6)),
        int(kw.get("inner_proto", 0)),
        int(kw.get("icmp_type", 0)),
        int(kw.get("icmp_code", 0)),
        b"cni0",
    )


def test_icmp_error_event_is_of_the_flow_it_quotes() -> None:
    """An ICMP error's tuple is the quoted packet's; as a flow packet it travels back."""
    from tracer.events.rows import CODEC, rows_of

    raw = _record(proto=1, inner_proto=17, icmp_type=3, icmp_code=3)
    ev = decode(raw)
    assert ev.is_icmp and ev.flow_proto == 17 and (ev.icmp_type, ev.icmp_code) == (3, 3)
    assert str(ev.flow_tuple) == "10.0.0.2:80 -> 10.0.0.1:1234"
    # seq / ack_seq hold the error's own addresses
    assert ev.icmp_src == "0.0.0.100" and ev.icmp_dst == "0.0.0.200"
    assert encode(ev) == raw
    cols = CODEC.columns(rows_of(raw + _record(proto=17)))
    # the columns carry the flow's tuple (reversed for the error) and its protocol
    assert cols.saddr.tolist() == [0x0A000002, 0x0A000001]
    assert cols.ports.tolist() == [80 << 16 | 1234, 1234 << 16 | 80]
    assert cols.udp is not None and cols.udp.tolist() == [True, True]
    assert CODEC.columns(rows_of(_record())).udp is None


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


def test_numpy_dtype_follows_the_layout() -> None:
    assert EVENT_DTYPE.itemsize == EVENT_SIZE
    fields = {name: (off, dt.itemsize) for name, (dt, off) in EVENT_DTYPE.fields.items()}
    assert fields == {name: spec for name, spec in LAYOUT.items() if name != "_pad"}


def _fixture_records(name: str) -> list[bytes]:
    from tests.fixtures.loader import HERE

    return [bytes.fromhex(r) for r in json.loads((HERE / name).read_text())["records"]]


@pytest.mark.parametrize("name", ["seed-broken.json", "seed-healthy.json"])
def test_decode_batch_equals_decode_per_record(name: str) -> None:
    recs = _fixture_records(name)
    want = [decode(r) for r in recs]
    assert decode_batch(b"".join(recs)) == want
    arr = np.frombuffer(b"".join(recs), dtype=np.uint8).reshape(-1, EVENT_SIZE)
    assert decode_batch(arr) == want
    assert decode_batch(arr[5:9]) == want[5:9]
    assert decode_batch(arr[::2]) == want[::2], "strided rows are copied, not misread"


def test_decode_batch_edge_values() -> None:
    """Unsigned fields at their maxima, a negative priority, no conntrack, odd device names."""
    untracked = bytearray(_record(point=31))
    struct.pack_into("<Q", untracked, 0, 2**64 - 1)  # ts_ns
    struct.pack_into("<i", untracked, 44, -(2**31))  # nf_prio
    struct.pack_into("<I", untracked, 76, 0xFFFF0000)  # reason
    untracked[70] = 0x02  # ct_flags: untracked, no entry
    untracked[112:128] = b"veth\0garbage\0\0\0\0"
    long_name = bytearray(_record())
    long_name[112:128] = b"a-16-byte-name!!"  # no NUL at all
    bad_utf8 = bytearray(_record())
    bad_utf8[112:116] = b"\xff\xfe\0\0"
    recs = [bytes(r) for r in (untracked, long_name, bad_utf8, _record())]
    assert decode_batch(b"".join(recs)) == [decode(r) for r in recs]
    ev = decode_batch(recs[0])[0]
    assert ev.ct is None and ev.untracked and ev.dev == "veth" and ev.nf_prio == -(2**31)


def test_decode_batch_of_nothing_and_of_a_partial_record() -> None:
    assert decode_batch(b"") == []
    assert decode_batch(np.empty((0, EVENT_SIZE), dtype=np.uint8)) == []
    with pytest.raises(HairtraceError, match="do not match"):
        decode_batch(_record() + _record()[:100])


def test_counters_struct_is_what_user_space_sums(bpf_object: Path) -> None:
    """struct ht_counters, one copy per CPU (a per-CPU array): the loader sums the copies
    in the layout it unpacks (emitted, lost, over_budget; HT_PT_MAX each)."""
    from tracer.trace import HT_PT_MAX, summed_counters

    cnt = object_btf(bpf_object).find("ht_counters", KIND_STRUCT)
    assert cnt is not None and cnt.size_or_type == 3 * HT_PT_MAX * 8
    assert [(n, b // 8) for n, _t, b in cnt.members] == [
        ("emitted", 0),
        ("lost", HT_PT_MAX * 8),
        ("over_budget", 2 * HT_PT_MAX * 8),
    ]
    cpu0 = struct.pack(f"<{3 * HT_PT_MAX}Q", *range(3 * HT_PT_MAX))
    cpu1 = struct.pack(f"<{3 * HT_PT_MAX}Q", *([7] * 3 * HT_PT_MAX))
    total = struct.unpack(f"<{3 * HT_PT_MAX}Q", summed_counters([cpu0, cpu1]))
    assert total == tuple(i + 7 for i in range(3 * HT_PT_MAX))
