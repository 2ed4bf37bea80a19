"""Per-trace ids for the kernel addresses of raw records (tracer.kernel.pseudonyms)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tracer.errors import HairtraceError
from tracer.events.codec import EVENT_DTYPE, EVENT_SIZE, decode_batch
from tracer.kernel import pseudonyms
from tracer.kernel.ksyms import load_text
from tracer.kernel.pseudonyms import FIELDS, Pseudonyms, pseudonymised

SKB, CT, TEXT = 0xFFFF88811B5352E0, 0xFFFF8881062A4B00, 0xFFFFFFFF81FBE3FF


def _batch(skb: list[int], ct: list[int], loc: list[int], size: int = EVENT_SIZE) -> np.ndarray:
    """Records with the given address fields; every other byte random (must survive)."""
    n = len(skb)
    rng = np.random.default_rng(n)
    out = rng.integers(0, 256, (n, size), dtype=np.uint8)
    rec = out[:, :EVENT_SIZE].copy().reshape(-1).view(EVENT_DTYPE)
    rec["skb"], rec["ct_id"], rec["location"] = skb, ct, loc
    out[:, :EVENT_SIZE] = rec.view(np.uint8).reshape(n, EVENT_SIZE)
    return out


def _fields(batch: np.ndarray) -> dict[str, list[int]]:
    rec = np.ascontiguousarray(batch[:, :EVENT_SIZE]).reshape(-1).view(EVENT_DTYPE)
    return {name: rec[name].tolist() for name in FIELDS}


def test_ids_in_order_of_first_appearance_per_field_and_zero_kept() -> None:
    b = _batch(
        [SKB + 64, SKB, SKB + 64, SKB + 128],
        [0, CT, 0, CT],
        [0, 0, TEXT, TEXT + 0x40],
    )
    Pseudonyms().rewrite(b)
    assert _fields(b) == {"skb": [1, 2, 1, 3], "ct_id": [0, 1, 0, 1], "location": [0, 0, 1, 2]}


def test_only_the_address_fields_change() -> None:
    b = _batch([SKB, SKB + 8], [CT, 0], [TEXT, 0])
    before = b.copy()
    Pseudonyms().rewrite(b)
    changed = np.flatnonzero((b != before).any(axis=0))
    assert set(changed.tolist()) <= set(range(8, 32))
    assert changed.size  # they did change
    ev, orig = decode_batch(b), decode_batch(before)
    assert [e.tuple for e in ev] == [e.tuple for e in orig]
    assert [e.ts_ns for e in ev] == [e.ts_ns for e in orig]


def test_ids_are_stable_across_batches() -> None:
    names = Pseudonyms()
    first = _batch([SKB, SKB + 64], [CT, CT + 320], [0, TEXT])
    later = _batch([SKB + 64, SKB + 192, SKB], [CT + 320, 0, CT + 640], [TEXT, TEXT + 4, 0])
    names.rewrite(first)
    names.rewrite(later)
    assert _fields(first) == {"skb": [1, 2], "ct_id": [1, 2], "location": [0, 1]}
    assert _fields(later) == {"skb": [2, 3, 1], "ct_id": [2, 0, 3], "location": [1, 2, 0]}
    assert [names.count(f) for f in FIELDS] == [3, 3, 2]


def test_identity_is_kept_and_splitting_a_batch_changes_nothing() -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    pool = np.uint64(0xFFFF888100000000) + rng.integers(0, 3000, n).astype(np.uint64) * 256
    skb = pool.tolist()
    ct = np.where(rng.random(n) < 0.3, 0, pool[::-1]).tolist()
    loc = np.where(rng.random(n) < 0.95, 0, np.uint64(TEXT) + pool % 512).tolist()
    whole = _batch(skb, ct, loc)
    orig = _fields(whole)
    Pseudonyms().rewrite(whole)
    ids = _fields(whole)
    for name in FIELDS:
        a, b = orig[name], ids[name]
        assert [x == 0 for x in a] == [y == 0 for y in b], name
        # value -> id is a function and one to one: as many pairs as values, as ids
        pairs = set(zip(a, b, strict=True))
        assert len(pairs) == len(set(a)) == len(set(b)), name
        nonzero = {y for y in b if y}
        assert nonzero == set(range(1, len(nonzero) + 1)), name  # ids 1..k, no gaps
        assert max(b) < 2**32 <= max(a), name
    pieces = _batch(skb, ct, loc)
    names = Pseudonyms()
    for lo, hi in ((0, 1), (1, 500), (500, 12_345), (12_345, n)):  # one of a single record
        part = pieces[lo:hi].copy()
        names.rewrite(part)
        pieces[lo:hi] = part
    assert (pieces == whole).all()


def test_applied_to_its_own_output_it_changes_nothing() -> None:
    b = _batch([SKB, SKB + 8, SKB, SKB + 16], [CT, 0, CT + 8, CT], [0, TEXT, TEXT, 0])
    Pseudonyms().rewrite(b)
    once = b.copy()
    Pseudonyms().rewrite(b)
    assert (b == once).all()


def test_wider_records_and_a_session_chunk() -> None:
    b = _batch([SKB, SKB + 8], [CT, CT], [0, TEXT], size=EVENT_SIZE + 16)
    payload = b.tobytes()
    out = pseudonymised(payload, EVENT_SIZE + 16, Pseudonyms())
    assert len(out) == len(payload)
    back = np.frombuffer(out, dtype=np.uint8).reshape(2, -1)
    assert _fields(back) == {"skb": [1, 2], "ct_id": [1, 1], "location": [0, 1]}
    assert (back[:, 32:] == b[:, 32:]).all() and (back[:, :8] == b[:, :8]).all()


def test_empty_batch_and_not_a_batch() -> None:
    Pseudonyms().rewrite(np.empty((0, EVENT_SIZE), dtype=np.uint8))
    with pytest.raises(HairtraceError, match="not a batch of records"):
        Pseudonyms().rewrite(np.zeros((3, 64), dtype=np.uint8))
    with pytest.raises(HairtraceError, match="not a batch of records"):
        Pseudonyms().rewrite(np.zeros(EVENT_SIZE, dtype=np.uint8))


def test_location_names_keep_function_names_not_addresses(tmp_path: Path) -> None:
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81fbe3a0 t nft_do_chain\n"
        "ffffffff81fbe000 T nft_other\n"  # out of order: kallsyms is not sorted everywhere
        "ffffffff81fbf000 d some_data\n"  # data, not text
        "ffffffffc0a01000 t br_handle_frame_finish\t[bridge]\n"
    )
    text = load_text(kallsyms)
    assert text.function_at(0xFFFFFFFF81FBE3FF) == "nft_do_chain+0x5f"
    assert text.function_at(0xFFFFFFFF81FBE010) == "nft_other+0x10"
    assert text.function_at(0xFFFFFFFFC0A01020) == "br_handle_frame_finish+0x20"
    assert text.function_at(0x1000) is None  # below every symbol
    assert text.function_at(0xFFFFFFFF81FBE3A0 + (1 << 21)) is None  # far past the last one
    names = Pseudonyms()
    names.rewrite(_batch([SKB, SKB], [0, 0], [0xFFFFFFFFC0A01020, 0xFFFFFFFF81FBE3FF]))
    names.rewrite(_batch([SKB], [0], [0x1000]))
    assert names.location_names(text.function_at) == {
        1: "br_handle_frame_finish+0x20",
        2: "nft_do_chain+0x5f",
    }


def test_hidden_kallsyms_names_nothing(tmp_path: Path) -> None:
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("0000000000000000 T _stext\n0000000000000000 t nft_do_chain\n")
    assert load_text(kallsyms).function_at(TEXT) is None
    assert load_text(tmp_path / "missing").function_at(TEXT) is None


@pytest.mark.parametrize("merge_at", [1, 16, 4096])
def test_the_same_ids_as_a_plain_dict_over_many_batches(
    merge_at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the definition, record by record; small merge_at: the sorted tables take over."""
    monkeypatch.setattr(pseudonyms._Table, "MERGE_AT", merge_at)
    rng = np.random.default_rng(merge_at)
    names, want = Pseudonyms(), {f: dict[int, int]() for f in FIELDS}
    for size in rng.integers(1, 900, 40).tolist():
        pool = np.uint64(0xFFFF888100000000) + rng.integers(0, 5000, size).astype(np.uint64) * 64
        ct = np.where(rng.random(size) < 0.5, np.uint64(0), pool + np.uint64(1 << 30))
        loc = np.where(rng.random(size) < 0.9, np.uint64(0), np.uint64(TEXT) + pool % 97)
        b = _batch(pool.tolist(), ct.tolist(), loc.tolist())
        orig = _fields(b)
        names.rewrite(b)
        got = _fields(b)
        for f in FIELDS:
            ids = want[f]
            expect = [0 if v == 0 else ids.setdefault(v, len(ids) + 1) for v in orig[f]]
            assert got[f] == expect, f
    assert [names.count(f) for f in FIELDS] == [len(want[f]) for f in FIELDS]
