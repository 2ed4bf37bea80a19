"""`--json -` with `-- CMD` on the seed lab: stdout holds the report alone, CMD's output goes
to stderr, so the report pipes into a JSON parser (issue 17, item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_live

ROOT = Path(__file__).resolve().parent.parent
SEED_LAB = ROOT / "scripts" / "seed-lab.sh"
SVC = "100.67.30.133"
# a CMD that writes to stdout itself and through curl (the backend's body, when it answers)
CMD = ["sh", "-c", f"echo from-cmd; ip netns exec poda curl -s -m 3 http://{SVC}/"]

pytestmark = pytest.mark.live


def _lab(action: str, *args: str) -> None:
    subprocess.run(
        ["bash", str(SEED_LAB), action, *args], check=True, capture_output=True, timeout=60
    )


@pytest.fixture
def seed_lab(request: pytest.FixtureRequest) -> Iterator[str]:
    needs_live()
    knob = getattr(request, "param", "0")
    _lab("down")
    _lab("up", knob)
    try:
        yield knob
    finally:
        _lab("down")


def hairtrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracer.cli", "--svc", SVC, "--netns", "node", "--no-live", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.parametrize("seed_lab,status", [("0", 3), ("1", 0)], indirect=["seed_lab"])
def test_json_to_stdout_holds_the_report_only(seed_lab: str, status: int) -> None:
    res = hairtrace("--json", "-", "--", *CMD)
    assert res.returncode == status, res.stderr
    report = json.loads(res.stdout)  # the whole of stdout is one JSON document
    assert report["schema"] == "hairtrace/report@1"
    assert "from-cmd" in res.stderr.splitlines()
    verdicts = {c["verdict"] for c in report["connections"]}
    assert verdicts == ({"broken"} if seed_lab == "0" else {"ok"}), verdicts
    if seed_lab == "1":
        assert "seed-lab.sh: pod B" in res.stderr  # the backend's body, as curl printed it


def test_json_to_a_file_leaves_cmd_stdout_alone(seed_lab: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = hairtrace("--json", str(out), "--", *CMD)
    assert res.returncode == 3, res.stderr
    assert res.stdout.splitlines() == ["from-cmd"]
    assert json.loads(out.read_text())["schema"] == "hairtrace/report@1"
