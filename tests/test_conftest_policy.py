"""The CI policy of tests/conftest.py: skips are skips locally and failures under CI=true.

Each case runs pytest in a subprocess on a temporary directory holding a copy
of tests/conftest.py and a small test file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def run_pytest(tmp_path: Path, source: str, *, ci: bool) -> subprocess.CompletedProcess[str]:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        # hypothesis' plugin is not needed here and costs a second per run
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:hypothesispytest",
            "-q",
            "-rA",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


SKIPPING = """
    import pytest

    def test_skips():
        pytest.skip("no widget here")
"""


def test_skip_is_a_skip_without_ci(tmp_path: Path) -> None:
    res = run_pytest(tmp_path, SKIPPING, ci=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout


def test_skip_fails_under_ci(tmp_path: Path) -> None:
    res = run_pytest(tmp_path, SKIPPING, ci=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 failed" in res.stdout
    assert "no widget here" in res.stdout


MIXED = """
    import pytest

    @pytest.mark.optional
    def test_optional_skip():
        pytest.skip("optional thing absent")

    def test_require_unmet(require):
        require(False, "the frobnicator")

    def test_require_met(require):
        require(True, "always there")

    @pytest.mark.xfail(reason="known bug", strict=True)
    def test_xfail():
        assert False

    @pytest.mark.needs_binary("surely-no-such-program-hairtrace")
    def test_missing_binary():
        pass

    @pytest.fixture
    def skipping_fixture():
        pytest.skip("fixture cannot set up")

    def test_fixture_skip(skipping_fixture):
        pass
"""


@pytest.mark.parametrize("ci", [False, True], ids=["local", "ci"])
def test_mixed_outcomes(tmp_path: Path, ci: bool) -> None:
    res = run_pytest(tmp_path, MIXED, ci=ci)
    out = res.stdout
    assert "SKIPPED [1] test_sample.py" in out and "optional thing absent" in out, out
    assert "PASSED test_sample.py::test_require_met" in out, out
    assert "XFAIL test_sample.py::test_xfail" in out, out
    if not ci:
        assert res.returncode == 0, out + res.stderr
        assert "4 skipped" in out and "1 passed" in out and "1 xfailed" in out, out
    else:
        assert res.returncode == 1, out + res.stderr
        assert "FAILED test_sample.py::test_require_unmet" in out, out
        assert "the frobnicator" in out
        assert "surely-no-such-program-hairtrace" in out
        assert "fixture cannot set up" in out
        assert "1 skipped" in out and "1 failed" in out and "2 errors" in out, out


MODULE_SKIP = """
    import pytest

    pytest.skip("whole module unavailable", allow_module_level=True)

    def test_never():
        pass
"""


@pytest.mark.parametrize("ci", [False, True], ids=["local", "ci"])
def test_module_level_skip(tmp_path: Path, ci: bool) -> None:
    res = run_pytest(tmp_path, MODULE_SKIP, ci=ci)
    if not ci:
        # the module's only test was never collected: pytest says "no tests ran"
        assert res.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, res.stdout + res.stderr
        assert "1 skipped" in res.stdout
    else:
        assert res.returncode == 1, res.stdout + res.stderr
        assert "1 failed" in res.stdout
        assert "whole module unavailable" in res.stdout
