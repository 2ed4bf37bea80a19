"""No kernel address in what is handed around: sessions, JSON reports, exports.

Records carry per-trace ids for skb, conntrack entry and drop location from session
format 1.1 (tracer.kernel.pseudonyms); older files (tests/fixtures/faults/*.hts were
recorded before it, with real addresses) get the same ids when read.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tracer.errors import HairtraceError
from tracer.events.codec import EVENT_DTYPE, EVENT_SIZE, decode_batch
from tracer.events.model import Event
from tracer.kernel.pseudonyms import FIELDS, Pseudonyms
from tracer.present.report import build
from tracer.session import (
    FORMAT_NAME,
    SessionFooter,
    SessionHeader,
    SessionReader,
    SessionWriter,
    export_session,
    open_session,
    replay,
)
from tracer.session.format import FORMAT_MINOR
from tracer.trace import _Live

ROOT = Path(__file__).resolve().parent.parent.parent
FAULTS = ROOT / "tests" / "fixtures" / "faults"
ALL = sorted(p.name for p in FAULTS.glob("*.hts"))
OLD = [n for n in ALL if open_session(FAULTS / n).header.format_minor < 1]  # before ids
KERNEL = 0xFFFF000000000000  # every kernel pointer on x86_64 / arm64 is above this
ADDRESS_HEX = re.compile(r"0xffff[0-9a-f]{8,}", re.IGNORECASE)
DIGITS = re.compile(r"\d{16,}")  # an address written in decimal has 20 digits


def no_address(text: str) -> list[str]:
    """The kernel addresses written in text, in hex or decimal (expected: none)."""
    return ADDRESS_HEX.findall(text) + [d for d in DIGITS.findall(text) if int(d) >= KERNEL]


def raw_records(path: Path) -> np.ndarray:
    """The records as the file holds them, whatever its version (no ids applied)."""
    reader = SessionReader(path)
    reader.header = replace(reader.header, format_minor=FORMAT_MINOR)
    size = reader.header.record_size
    return np.concatenate([np.frombuffer(p, np.uint8).reshape(-1, size) for p in reader.payloads()])


def read_records(path: Path) -> np.ndarray:
    reader = open_session(path)
    size = reader.header.record_size
    return np.concatenate([np.frombuffer(p, np.uint8).reshape(-1, size) for p in reader.payloads()])


def address_fields(records: np.ndarray) -> dict[str, np.ndarray]:
    rec = np.ascontiguousarray(records[:, :EVENT_SIZE]).reshape(-1).view(EVENT_DTYPE)
    return {name: rec[name] for name in FIELDS}


def copy_as(path: Path, out: Path, records: np.ndarray, **footer: Any) -> None:
    """path's header and footer with records, written as format 1.1 (what the tracer writes)."""
    reader = open_session(path)
    header = replace(reader.header, format_minor=FORMAT_MINOR)
    assert reader.footer is not None
    with SessionWriter(out, header) as w:
        w.write_records(np.ascontiguousarray(records).tobytes())
        w.close(replace(reader.footer, **footer))


def report_text(path: Path) -> str:
    res = replay(path)
    return json.dumps(build(res.run, res.results), indent=2)


def exports(path: Path) -> dict[str, str]:
    """Each export format as text (parquet read back and written as CSV)."""
    out: dict[str, str] = {}
    for fmt in ("csv", "jsonl", "parquet"):
        buf = io.BytesIO()
        export_session(path, fmt, buf)
        if fmt == "parquet":
            buf.seek(0)
            out[fmt] = pd.read_parquet(buf).to_csv(index=False)
        else:
            out[fmt] = buf.getvalue().decode()
    return out


def test_there_are_old_fixtures() -> None:
    assert len(OLD) >= 10, "the fault fixtures recorded before format 1.1 test the reader"


@pytest.mark.parametrize("name", ALL)
def test_old_fixtures_hold_kernel_addresses_new_ones_ids(name: str) -> None:
    """What the other tests rest on: the old files really carry addresses."""
    raw = address_fields(raw_records(FAULTS / name))
    if name in OLD:
        assert (raw["skb"] >= KERNEL).all()
        assert (raw["ct_id"][raw["ct_id"] != 0] >= KERNEL).all()
    else:
        assert all(v.max(initial=0) < 2**32 for v in raw.values())


@pytest.mark.parametrize("name", ALL)
def test_old_session_replays_and_exports_without_kernel_addresses(name: str) -> None:
    path = FAULTS / name
    res = replay(path)
    assert res.events
    for ev in res.events:
        assert ev.skb < 2**32 and ev.location < 2**32
        assert ev.ct is None or ev.ct.id < 2**32
    assert all(
        max(v.tolist(), default=0) < 2**32 for v in address_fields(read_records(path)).values()
    )
    assert no_address(report_text(path)) == []
    for fmt, text in exports(path).items():
        assert no_address(text) == [], fmt
        df = (
            pd.read_json(io.StringIO(text), lines=True, dtype=False)
            if fmt == "jsonl"
            else pd.read_csv(io.StringIO(text), dtype=str)
        )
        ids = [int(v, 16) for col in ("skb", "ct_id") for v in df[col].dropna()]
        # every event has an skb id; most have a conntrack entry too (not those of a
        # packet conntrack dropped for want of an entry: conntrack-table-full)
        assert len(ids) >= len(df) + df["ct_id"].notna().sum() and max(ids) < 2**32, fmt


def test_old_session_streamed_report_has_no_kernel_address(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "replay", str(FAULTS / "conntrack-miss.hts"),
         "--json", str(out), "--stream"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    text = out.read_text()
    assert '"id": "0x1"' in text  # the conntrack entry, by its per-trace id
    assert no_address(text) == [] and no_address(res.stderr) == []


@pytest.mark.parametrize("name", OLD)
def test_ids_give_the_verdicts_the_addresses_gave(name: str, tmp_path: Path) -> None:
    """The same report from the raw addresses (the file rewritten as if new) as from ids,
    except for the hex of the ids themselves."""
    raw = tmp_path / "raw.hts"
    copy_as(FAULTS / name, raw, raw_records(FAULTS / name))
    with_addresses, with_ids = report_text(raw), report_text(FAULTS / name)
    assert no_address(with_addresses)  # the copy did keep the addresses
    hexes = re.compile(r"0x[0-9a-f]+")
    assert hexes.sub("0x", with_addresses) == hexes.sub("0x", with_ids)
    assert [c.verdict for _, c in replay(raw).results] == [
        c.verdict for _, c in replay(FAULTS / name).results
    ]


def test_a_new_version_file_is_read_as_written(tmp_path: Path) -> None:
    path = FAULTS / "conntrack-miss.hts"
    ids = read_records(path)
    new = tmp_path / "new.hts"
    copy_as(path, new, ids)
    assert open_session(new).header.format_minor == FORMAT_MINOR
    back = read_records(new)
    assert (back == ids).all()  # not mapped again on read
    again = back.copy()
    Pseudonyms().rewrite(again)
    assert (again == back).all()  # and mapping it again would change nothing
    assert (raw_records(path) != ids).any()


def test_footer_locations_name_the_export_location_column(tmp_path: Path) -> None:
    path = FAULTS / "conntrack-miss.hts"
    ids = read_records(path)
    loc = address_fields(ids)["location"]
    assert sorted(set(loc.tolist())) == [0, 1, 2]
    new = tmp_path / "new.hts"
    copy_as(path, new, ids, locations={1: "nft_do_chain+0x2d4"})
    assert open_session(new).footer.locations == {1: "nft_do_chain+0x2d4"}  # type: ignore[union-attr]
    buf = io.BytesIO()
    export_session(new, "csv", buf)
    buf.seek(0)
    df = pd.read_csv(buf, dtype=str, keep_default_na=False)
    want = {0: "", 1: "nft_do_chain+0x2d4", 2: "0x2"}  # named, else the id; empty: none
    assert df["location"].tolist() == [want[v] for v in loc.tolist()]
    assert set(df.loc[df["location"] != "", "point"]) == {"kfree_skb"}


def test_header_minor_and_footer_locations_in_the_file_format() -> None:
    header = open_session(FAULTS / "none.hts").header
    d = replace(header, format_minor=FORMAT_MINOR).to_dict()
    assert d["format"] == FORMAT_NAME and d["format_minor"] == FORMAT_MINOR == 2
    assert SessionHeader.from_dict(d).format_minor == 2
    assert d["protocols"] == ["tcp"]  # recorded before 1.2: TCP only
    both = SessionHeader.from_dict({**d, "protocols": ["tcp", "udp"]})
    assert both.protocols == ("tcp", "udp")
    with pytest.raises(HairtraceError, match="'protocols'"):
        SessionHeader.from_dict({**d, "protocols": ["icmp"]})
    del d["format_minor"]
    del d["protocols"]
    older = SessionHeader.from_dict(d)
    assert (older.format_minor, older.protocols) == (0, ("tcp",))  # older files
    foot = SessionFooter(end_ns=5, events=1, locations={3: "tcp_v4_rcv+0xe19"})
    assert foot.to_dict()["locations"] == {"3": "tcp_v4_rcv+0xe19"}
    assert SessionFooter.from_dict(foot.to_dict()) == foot
    bad = {**foot.to_dict(), "locations": {"0xffffffff81fbe3ff": "x"}}
    with pytest.raises(HairtraceError, match="'locations' is not id -> function"):
        SessionFooter.from_dict(bad)


class _Writer:
    def __init__(self) -> None:
        self.batches: list[bytes] = []

    def write_records(self, batch: np.ndarray) -> None:
        self.batches.append(batch.tobytes())


def test_live_batches_get_ids_before_anything_sees_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """tracer.trace._Live.add: what the analysis engine is fed, the recorder and the kept
    chunks."""
    raw = raw_records(FAULTS / "conntrack-miss.hts")
    fed: list[Event] = []
    live = _Live(
        judge=lambda batch: fed.extend(decode_batch(batch)), keep_records=True, writer=_Writer()
    )
    for lo in range(0, len(raw), 7):
        live.add(raw[lo : lo + 7].copy())
    ids = read_records(FAULTS / "conntrack-miss.hts")  # the reader's ids for the same file
    assert (np.concatenate(live.chunks) == ids).all()
    assert b"".join(live.writer.batches) == ids.tobytes()
    assert len(fed) == len(raw)
    assert max(max(e.skb, e.location, e.ct.id if e.ct else 0) for e in fed) < 2**32
    addrs = sorted(set(address_fields(raw)["location"].tolist()) - {0})

    class Text:
        def function_at(self, addr: int) -> str | None:
            return "nft_do_chain+0x10" if addr == addrs[0] else None

    monkeypatch.setattr("tracer.trace.load_text", Text)
    assert live.location_names() == {1: "nft_do_chain+0x10"}


# ------------------------------------------------------------------------------- live

SVC = "100.67.30.133"
LAB = ["bash", str(ROOT / "scripts" / "seed-lab.sh")]


@pytest.mark.live
def test_a_recorded_trace_holds_no_kernel_address(tmp_path: Path) -> None:
    session, report = tmp_path / "seed.hts", tmp_path / "live.json"
    subprocess.run([*LAB, "down"], check=True, capture_output=True, timeout=60)
    subprocess.run([*LAB, "up", "0"], check=True, capture_output=True, timeout=60)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "tracer.cli", "--no-live", "--svc", SVC, "--netns", "node",
             "--record", str(session), "--json", str(report), "--",
             "ip", "netns", "exec", "poda", "curl", "-s", "-m", "3", f"http://{SVC}/"],
            capture_output=True, text=True, timeout=90, cwd=ROOT, check=False,
        )  # fmt: skip
    finally:
        subprocess.run([*LAB, "down"], check=True, capture_output=True, timeout=60)
    assert res.returncode == 3, res.stderr
    r = json.loads(report.read_text())
    assert r["connections"][0]["break"]["cause"] == "bridge-nf-call-iptables-off"
    reader = open_session(session)
    assert reader.header.format_minor == FORMAT_MINOR and reader.footer is not None
    # the bytes of the file, not what the reader makes of them
    fields = address_fields(raw_records(session))
    assert len(fields["skb"]) == r["events"] > 0
    for name, values in fields.items():
        assert values.max(initial=0) < 2**32, name
    assert fields["skb"].min() > 0
    assert (fields["ct_id"] > 0).any(), "conntrack entries were seen (as ids)"
    ct_ids = {
        h["ct"]["id"] for c in r["connections"] for p in c["packets"] for h in p["hops"] if h["ct"]
    }
    assert ct_ids and all(int(i, 16) < 2**32 for i in ct_ids)
    located = set(fields["location"].tolist()) - {0}
    assert all(re.fullmatch(r"[\w.]+\+0x[0-9a-f]+", n) for n in reader.footer.locations.values())
    assert located == set(reader.footer.locations), "every drop location named on this host"
    texts = {"report": report.read_text(), "stderr": res.stderr, **exports(session)}
    for what, text in texts.items():
        assert no_address(text) == [], what
    assert no_address(session.read_bytes().decode("latin-1")) == []  # header/footer JSON too
