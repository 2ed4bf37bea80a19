"""Export (CSV, JSON Lines, Parquet) and the DataFrame API, from fixture sessions."""

from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from tests.session.helpers import write_fixture
from tracer.analysis import analyse
from tracer.errors import HairtraceError, UsageError
from tracer.session import (
    COLUMNS,
    default_out,
    export_session,
    load_connections,
    load_events,
    pandas_dtypes,
)
from tracer.session import export as export_mod
from tracer.session.format import CHUNK, PREAMBLE


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    path = tmp_path / "broken.hts"
    write_fixture("seed-broken.json", path, batch=10)
    return path


def _read_back(data: bytes | Path, fmt: str) -> pd.DataFrame:
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    if fmt == "csv":
        return pd.read_csv(src, dtype=pandas_dtypes())
    if fmt == "jsonl":
        df = pd.read_json(src, lines=True, dtype=False)
        return df.astype(pandas_dtypes())
    return pd.read_parquet(src)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_categorical=False)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_round_trip(
    broken: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_mod, "BATCH_ROWS", 16)  # several writes / row groups
    summary = export_session(broken, fmt)
    assert summary.out == default_out(broken, fmt) == tmp_path / f"broken.{fmt}"
    assert summary.rows == 63 and summary.warnings == ()
    back = _read_back(summary.out, fmt)
    assert list(back.columns) == [c.name for c in COLUMNS]
    assert back.dtypes.astype(str).to_dict() == pandas_dtypes()
    _same(back, load_events(broken))
    stream = io.BytesIO()
    assert export_session(broken, fmt, stream).out is None
    _same(_read_back(stream.getvalue(), fmt), back)
    assert not list(tmp_path.glob(".*tmp"))


def test_event_values(broken: Path) -> None:
    df = load_events(broken)
    assert len(df) == 63 and df.attrs["warnings"] == []
    assert df.dtypes.astype(str).to_dict() == pandas_dtypes()
    first = df.iloc[0]
    assert (first.point, first.tcp_flags, first.role, first.dport) == (
        "net_dev_start_xmit", "SYN", "SYN", 80,
    )  # fmt: skip
    assert first.ts == pytest.approx((first.ts_ns - 681838500063) / 1e9)
    assert set(df.tcp_flags) >= {"SYN", "SYN|ACK", "RST"}
    nat = df[df.point == "nf:PREROUTING@dnat"].iloc[0]
    assert nat.ct_id.startswith("0x") and "DST_NAT" in nat.ct_status
    assert nat.ct_original.endswith("-> 100.67.30.133:80") and nat.netns_name == "node"
    drops = df[df.kind == "drop"]
    assert len(drops) == 6 and drops.drop_reason.notna().all()
    assert df[df.kind != "drop"].drop_reason.isna().all()


@pytest.mark.parametrize("name", ["seed-broken.json", "seed-healthy.json"])
def test_connection_index_and_direction_match_reassembly(tmp_path: Path, name: str) -> None:
    path = tmp_path / "s.hts"
    fx = write_fixture(name, path, batch=7)
    df = load_events(path)
    expected: Counter[tuple[int, str, str]] = Counter()
    for i, (conn, _diag) in enumerate(analyse(fx.events, fx.context())):
        for p in conn.packets:
            expected[(i, p.direction, p.role)] += len(p.hops)
    got = Counter(
        (int(r.conn), r.direction, r.role) for r in df.itertuples() if not pd.isna(r.conn)
    )
    assert got == expected


def test_load_connections(broken: Path) -> None:
    df = load_connections(broken)
    assert len(df) == 1
    row = df.iloc[0]
    assert (row.verdict, row.cause, row.break_netns, row.break_dev, row.break_role) == (
        "broken", "bridge-nf-call-iptables-off", "node", "cni0", "SYN+ACK",
    )  # fmt: skip
    assert row.client.startswith("100.96.54.240:")
    assert (row.service, row.backend) == ("100.67.30.133:80", "100.96.54.247:80")
    assert 0 <= row.first_ts < row.last_ts and row.packets > 3
    assert str(df.verdict.dtype) == "category" and str(df.packets.dtype) == "int64"
    assert row.events == (load_events(broken).conn == 0).sum()


def test_export_refusals(broken: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown export format 'xml'"):
        export_session(broken, "xml")
    out = tmp_path / "out.csv"
    out.write_text("keep")
    with pytest.raises(UsageError, match=r"out.csv exists \(use --force to overwrite\)$"):
        export_session(broken, "csv", out)
    assert out.read_text() == "keep"
    assert export_session(broken, "csv", out, overwrite=True).rows == 63
    with pytest.raises(UsageError, match="is the session file itself"):
        export_session(broken, "csv", broken, overwrite=True)


def test_damaged_session_leaves_no_output(broken: Path, tmp_path: Path) -> None:
    data = bytearray(broken.read_bytes())
    data[-200] ^= 1  # inside the last event chunk, before the footer
    broken.write_bytes(data)
    with pytest.raises(HairtraceError, match="corrupt chunk at byte"):
        export_session(broken, "parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.hts"]


def test_cut_session_exports_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    write_fixture("seed-broken.json", path, batch=10, footer=False)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 5)
    summary = export_session(path, "jsonl")
    assert summary.rows == 60 and "cut off" in summary.warnings[0]
    assert load_events(path).attrs["warnings"] == list(summary.warnings)


def test_empty_session_exports_typed_empty_tables(tmp_path: Path) -> None:
    path = tmp_path / "s.hts"
    write_fixture("seed-broken.json", path, batch=100, footer=False)
    path.write_bytes(path.read_bytes()[: PREAMBLE.size + CHUNK.size + _header_len(path)])
    for fmt in ("csv", "jsonl", "parquet"):
        assert export_session(path, fmt).rows == 0
    back = _read_back(tmp_path / "s.parquet", "parquet")
    assert len(back) == 0 and back.dtypes.astype(str).to_dict() == pandas_dtypes()
    assert len(load_events(path)) == 0 and len(load_connections(path)) == 0


def _header_len(path: Path) -> int:
    length, *_ = CHUNK.unpack_from(path.read_bytes(), PREAMBLE.size)
    return int(length)


def test_importing_sessions_does_not_import_pandas_or_pyarrow() -> None:
    code = "import sys, tracer.session; print(sorted({'pandas', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
