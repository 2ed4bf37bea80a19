"""Session file writer and reader: round trip, refusals, damage, cut-off files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.loader import load
from tests.session.helpers import (
    batches,
    fixture_footer,
    fixture_header,
    records,
    tiny_topology,
    write_fixture,
)
from tracer.analysis.context import RuleDrop
from tracer.errors import HairtraceError, UsageError
from tracer.events.codec import decode_all
from tracer.session import (
    FORMAT_NAME,
    SessionFooter,
    SessionHeader,
    SessionWriter,
    check_target,
    open_session,
)
from tracer.session import writer as writer_mod
from tracer.session.format import CHUNK, END_SIZE, MAGIC, PREAMBLE, Kind, chunk_head

BROKEN = "seed-broken.json"


def _all_records(path: Path) -> list[bytes]:
    return [r for b in open_session(path).record_batches() for r in b]


def _chunk_offsets(path: Path) -> list[tuple[int, int, int]]:
    """(offset, kind, length) of every chunk after the preamble."""
    data, pos, out = path.read_bytes(), PREAMBLE.size, []
    while pos < len(data):
        length, kind, _crc, _check = CHUNK.unpack_from(data, pos)
        out.append((pos, kind, length))
        pos += CHUNK.size + length
    return out


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    fx = write_fixture(BROKEN, path, batch=10)
    r = open_session(path)
    assert r.warnings == []
    assert r.header == fixture_header(fx)
    assert r.footer == fixture_footer(fx)
    assert [len(b) for b in r.record_batches()] == [10] * 6 + [3]
    assert _all_records(path) == records(fx)
    assert list(r.events()) == fx.events
    assert r.header.to_dict()["format"] == FORMAT_NAME
    assert r.header.drop_reasons[3] == "NO_SOCKET"


def test_header_and_footer_dict_round_trip() -> None:
    fx = load(BROKEN)
    h = fixture_header(fx)
    assert SessionHeader.from_dict(h.to_dict()) == h
    f = fixture_footer(fx, topology=tiny_topology())
    f = SessionFooter(**{**f.__dict__, "loss_windows": ((1, 2), (5, 9))})
    assert SessionFooter.from_dict(f.to_dict()) == f


def test_footer_rule_drops_round_trip_and_old_footers() -> None:
    fx = load(BROKEN)
    drop = RuleDrop("filter", "FORWARD", "policy DROP of chain FORWARD", 2, "FORWARD")
    f = SessionFooter(**{**fixture_footer(fx).__dict__, "rule_drops": (drop,)})
    f = SessionFooter(**{**f.__dict__, "rule_drops_netns": 4026531840})
    assert SessionFooter.from_dict(f.to_dict()) == f
    old = {k: v for k, v in f.to_dict().items() if not k.startswith("rule_drops")}
    assert SessionFooter.from_dict(old) == fixture_footer(fx)  # files before rule drops
    for bad in ([{"table": "filter"}], [7], {"x": 1}):
        with pytest.raises(HairtraceError, match="bad session footer: 'rule_drops'"):
            SessionFooter.from_dict({**f.to_dict(), "rule_drops": bad})


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    path.write_text("precious")
    header = fixture_header(load(BROKEN))
    msg = f"session file {path} exists (use --force to overwrite)"
    with pytest.raises(HairtraceError, match="^" + msg.replace("(", r"\(").replace(")", r"\)")):
        SessionWriter(path, header)
    with pytest.raises(HairtraceError, match="exists"):
        check_target(path)
    assert path.read_text() == "precious"
    check_target(path, overwrite=True)
    check_target(tmp_path / "new.hts")
    with SessionWriter(path, header, overwrite=True) as w:
        w.close(SessionFooter(end_ns=1, events=0))
    assert open_session(path).footer == SessionFooter(end_ns=1, events=0)


def test_unwritable_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(HairtraceError, match="^cannot create session file .*: No such file"):
        SessionWriter(tmp_path / "no" / "s.hts", fixture_header(load(BROKEN)))


def test_one_writev_per_batch_and_fsync_at_most_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"writev": 0, "sync": 0}
    real_writev = os.writev

    def writev(fd: int, parts: list[bytes]) -> int:
        calls["writev"] += 1
        return real_writev(fd, parts)

    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.__setitem__("sync", calls["sync"] + 1))
    now = [0.0]
    fx = load(BROKEN)
    w = SessionWriter(
        tmp_path / "s.hts", fixture_header(fx), fsync_interval=5.0, clock=lambda: now[0]
    )
    for batch in batches(records(fx), 5):  # 13 batches, one second apart
        now[0] += 1.0
        w.write_records(batch)
    w.write_records([])  # nothing to write: no chunk
    assert calls == {"writev": 1 + 13, "sync": 2}  # header; at 5 s and 10 s
    w.close(fixture_footer(fx))
    assert calls == {"writev": 15, "sync": 3}  # footer + end marker in one writev; sync at close
    w.close()  # idempotent
    with pytest.raises(HairtraceError, match="already closed"):
        w.write_records(records(fx)[:1])


def test_large_batch_is_split_into_bounded_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_mod, "CHUNK_RECORDS", 4)
    fx = load(BROKEN)
    path = tmp_path / "s.hts"
    with SessionWriter(path, fixture_header(fx)) as w:
        w.write_records(records(fx)[:10])
        assert w.events == 10
    assert [len(b) for b in open_session(path).record_batches()] == [4, 4, 2]


def test_records_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    w = SessionWriter(tmp_path / "s.hts", fixture_header(load(BROKEN)))
    with pytest.raises(HairtraceError, match="not all 128 bytes"):
        w.write_records([bytes(128), bytes(127)])
    w.close()


def test_records_back_to_back_in_one_buffer_write_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drained numpy batch (or bytes) is recorded exactly as the list of its records."""
    import numpy as np

    monkeypatch.setattr(writer_mod, "CHUNK_RECORDS", 4)
    fx = load(BROKEN)
    recs = records(fx)[:10]
    paths = [tmp_path / f"{n}.hts" for n in ("list", "array", "bytes")]
    batches_as = [
        recs,
        np.frombuffer(b"".join(recs), dtype=np.uint8).reshape(-1, 128),
        b"".join(recs),
    ]
    for path, batch in zip(paths, batches_as, strict=True):
        with SessionWriter(path, fixture_header(fx)) as w:
            w.write_records(batch)
            w.write_records(b"")  # nothing to write: no chunk
            assert w.events == 10
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    assert _all_records(paths[1]) == recs
    w = SessionWriter(tmp_path / "bad.hts", fixture_header(fx))
    with pytest.raises(HairtraceError, match="not all 128 bytes"):
        w.write_records(b"".join(recs)[:-1])
    w.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty$"),
        (b"hello, world\n" * 3, "is not a hairtrace session file$"),
        (MAGIC[:5], "is cut off inside its header$"),
        (MAGIC + (2).to_bytes(4, "little") + bytes(40),
         r": session format 2 is newer than this hairtrace supports \(1\)$"),
        (MAGIC + (0).to_bytes(4, "little"), "unknown session format 0$"),
    ],
)  # fmt: skip
def test_bad_files_are_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.hts"
    path.write_bytes(content)
    with pytest.raises(HairtraceError, match=message) as info:
        open_session(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        open_session(tmp_path / "none.hts")
    with pytest.raises(HairtraceError, match="cannot read session file .*Is a directory"):
        open_session(tmp_path)


def test_truncated_header(tmp_path: Path) -> None:
    full = tmp_path / "s.hts"
    write_fixture(BROKEN, full)
    data = full.read_bytes()
    header_end = _chunk_offsets(full)[1][0]
    for cut in (PREAMBLE.size - 1, PREAMBLE.size, PREAMBLE.size + 20, header_end - 1):
        (tmp_path / "cut.hts").write_bytes(data[:cut])
        with pytest.raises(HairtraceError, match="cut off inside its header$"):
            open_session(tmp_path / "cut.hts")


def test_damaged_chunk_in_the_middle_is_named_by_its_byte(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    write_fixture(BROKEN, path, batch=10)
    chunks = _chunk_offsets(path)
    third = chunks[3][0]  # header, events, events, [events] ...
    data = bytearray(path.read_bytes())
    data[third + CHUNK.size + 50] ^= 0x40
    path.write_bytes(data)
    r = open_session(path)  # header and footer come without reading the events
    assert r.footer is not None and r.warnings == []
    with pytest.raises(HairtraceError, match=f"corrupt chunk at byte {third} \\(checksum"):
        list(r.record_batches())
    # a damaged chunk header in a file without its end marker: found by the scan at open
    data = bytearray(path.read_bytes()[:-END_SIZE])
    data[third + CHUNK.size + 50] ^= 0x40  # repair the payload
    data[chunks[2][0]] ^= 0x01  # damage a length
    path.write_bytes(data)
    with pytest.raises(HairtraceError, match=f"corrupt chunk at byte {chunks[2][0]} \\(damaged"):
        open_session(path)


def test_cut_at_every_byte_replays_the_complete_chunks(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    fx = write_fixture(BROKEN, path, batch=7, tiny=True)
    size, recs = path.stat().st_size, records(fx)
    chunks = _chunk_offsets(path)
    data_start = chunks[1][0]
    outcomes = {"error": 0, "partial": 0, "footer": 0}
    for n in range(size - 1, -1, -1):  # cut the same file shorter and shorter
        os.truncate(path, n)
        if n < data_start:
            with pytest.raises(HairtraceError):
                open_session(path)
            outcomes["error"] += 1
            continue
        r = open_session(path)
        assert r.warnings, n
        complete = [
            length // 128
            for pos, kind, length in chunks
            if kind == Kind.EVENTS and pos + CHUNK.size + length <= n
        ]
        assert [x for b in r.record_batches() for x in b] == recs[: sum(complete)], n
        outcomes["footer" if r.footer is not None else "partial"] += 1
        if r.footer is None:
            assert "has no footer" in r.warnings[-1]
    assert outcomes["footer"] == END_SIZE  # cut in or before the end marker: footer still read
    assert outcomes["error"] == data_start and outcomes["partial"] > 0


def test_zero_filled_tail_after_a_crash_is_a_cut(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    fx = write_fixture(BROKEN, path, footer=False)
    with open(path, "ab") as f:
        f.write(bytes(8192))
    r = open_session(path)
    assert r.footer is None
    assert "zero bytes" in r.warnings[0] and "has no footer" in r.warnings[1]
    assert _all_records(path) == records(fx)


def test_damaged_last_chunk_is_a_cut(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    fx = write_fixture(BROKEN, path, batch=10, footer=False)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(data)
    r = open_session(path)
    assert "last chunk, which is damaged" in r.warnings[0]
    assert _all_records(path) == records(fx)[:60]


def test_data_after_the_end_marker_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    write_fixture(BROKEN, path)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"x" * 100)
    with pytest.raises(HairtraceError, match=f"corrupt chunk at byte {size} \\(data after the end"):
        open_session(path)


def test_unknown_chunk_kinds_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    fx = load(BROKEN)
    with SessionWriter(path, fixture_header(fx)) as w:
        w.write_records(records(fx)[:3])
        payload = b'{"later": "optional data"}'
        w._write(chunk_head(Kind.TOPOLOGY, payload), payload)
        w.write_records(records(fx)[3:])
        w.close(fixture_footer(fx))
    r = open_session(path)
    assert r.warnings == [] and [len(b) for b in r.record_batches()] == [3, 60]


def test_footer_without_events_and_events_decode(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    fx = load(BROKEN)
    with SessionWriter(path, fixture_header(fx)) as w:
        w.close(SessionFooter(end_ns=5, events=0))
    r = open_session(path)
    assert list(r.record_batches()) == [] and r.footer == SessionFooter(end_ns=5, events=0)
    assert decode_all(records(fx)) == fx.events
