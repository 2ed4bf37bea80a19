"""The report written as the trace goes: the same bytes as json.dumps(build(...)), a file
that appears only complete, and /dev/null left alone."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from tracer.errors import HairtraceError
from tracer.present.report import build
from tracer.present.reportfile import ReportFile, ReportWriter
from tracer.session import replay

FAULTS = Path(__file__).resolve().parent.parent / "fixtures" / "faults"


@pytest.mark.parametrize("name", ["vxlan-fdb-missing.hts", "none.hts"])
def test_written_piece_by_piece_is_the_whole_report(name: str, tmp_path: Path) -> None:
    res = replay(FAULTS / name)
    dest = tmp_path / "r.json"
    out = ReportFile(str(dest))
    writer = ReportWriter(out.stream)
    writer.begin(replace(res.run, events=0, lost_events=None))  # the tail comes at the end
    for conn, diag in res.results:
        writer.add(conn, diag)
    assert not dest.exists()  # not until it is complete
    writer.end(res.run)
    out.done()
    assert dest.read_text() == json.dumps(build(res.run, res.results), indent=2) + "\n"
    assert writer.connections == len(res.results) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_no_connection_and_an_abandoned_report(tmp_path: Path) -> None:
    res = replay(FAULTS / "none.hts")
    dest = tmp_path / "r.json"
    out = ReportFile(str(dest))
    writer = ReportWriter(out.stream)
    writer.begin(res.run)
    writer.end(res.run)
    out.done()
    assert dest.read_text() == json.dumps(build(res.run, []), indent=2) + "\n"
    again = ReportFile(str(tmp_path / "x.json"))
    again.abandon()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_head_that_changed_is_refused(tmp_path: Path) -> None:
    res = replay(FAULTS / "none.hts")
    out = ReportFile(str(tmp_path / "r.json"))
    writer = ReportWriter(out.stream)
    writer.begin(res.run)
    with pytest.raises(HairtraceError, match="head changed"):
        writer.end(replace(res.run, kernel="other"))
    out.abandon()


def test_dev_null_is_written_not_replaced() -> None:
    res = replay(FAULTS / "none.hts")
    out = ReportFile(os.devnull)
    writer = ReportWriter(out.stream)
    writer.begin(res.run)
    writer.end(res.run)
    out.done()
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
