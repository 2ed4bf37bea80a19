"""Shared test policy for hairtrace: requirements that may skip locally but never in CI.

A test that needs something the machine may lack (root, BPF, network
namespaces, a binary, the built BPF object) states it with one of:

* a marker::

      @pytest.mark.live                       # root + BPF + netns
      @pytest.mark.needs_root
      @pytest.mark.needs_bpf
      @pytest.mark.needs_netns
      @pytest.mark.needs_binary("iptables", "nsenter")

* the ``require`` fixture (or the functions, ``from conftest import require, needs_root``)::

      def test_x(require):
          require(Path("/sys/kernel/btf/vmlinux").exists(), "kernel BTF")

* the fixtures ``bpf_object`` (Path of bpf/build/hairtrace.bpf.o, or $HAIRTRACE_BPF_OBJ)
  and ``repo_root``.

Outside CI an unmet requirement skips the test with its reason. With ``CI=true``
it FAILS the test instead, and so does any other skip (``pytest.skip``,
``pytest.importorskip``, ``skip``/``skipif`` markers, unittest's SkipTest, a
skip in a fixture, a whole module skipped at import), so a missing install
step cannot hide behind a green run. The only way out is to mark the test
``@pytest.mark.optional``: its skips stay skips in CI. (A module skipped at
import time has no markers to read and always fails in CI: skip inside the
tests of an optional module instead.) xfail is left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BPF_OBJECT = REPO_ROOT / "bpf" / "build" / "hairtrace.bpf.o"
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


# --------------------------------------------------------------------- policy


def in_ci() -> bool:
    """True when the CI environment variable says so (CI=true, as CI sets it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def _unmet(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"requirement not met under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def require(condition: object, reason: str) -> None:
    """Skip the current test with `reason` unless `condition` holds; fail under CI=true."""
    if not condition:
        _unmet(reason)


@functools.cache
def _check_root() -> str | None:
    return None if os.geteuid() == 0 else "needs root (euid 0)"


def needs_root() -> None:
    reason = _check_root()
    require(reason is None, reason or "")


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath)
    return shutil.which(name, path=os.pathsep.join([path, *_SBIN_DIRS]))


def needs_binary(name: str) -> str:
    """Return the path of executable `name` (sbin dirs included), or skip/fail."""
    found = _which(name)
    require(found is not None, f"needs the '{name}' program on PATH")
    assert found is not None
    return found


# bpf(2) syscall numbers, for a BPF_MAP_CREATE probe.
_NR_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}


@functools.cache
def _check_bpf() -> str | None:
    if os.geteuid() != 0:
        return "BPF needs root"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF at /sys/kernel/btf/vmlinux"
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        return None  # unknown syscall number: trust root + BTF
    libc = ctypes.CDLL(None, use_errno=True)
    # union bpf_attr for BPF_MAP_CREATE: map_type=ARRAY(2), key 4, value 4, 1 entry
    attr = (ctypes.c_uint32 * 5)(2, 4, 4, 1, 0)
    fd = libc.syscall(
        ctypes.c_long(nr), ctypes.c_int(0), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr))
    )
    if fd < 0:
        err = ctypes.get_errno()
        return f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)} (errno {err})"
    os.close(fd)
    return None


def needs_bpf() -> None:
    """Root, kernel BTF, and a working bpf() syscall."""
    reason = _check_bpf()
    require(reason is None, reason or "")


@functools.cache
def _check_netns() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if _which(tool) is None:
            return f"network namespaces need the '{tool}' program"
    try:
        res = subprocess.run(
            [_which("unshare") or "unshare", "--net", "true"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip() or res.returncode}"
    return None


def needs_netns() -> None:
    """Root and the ability to create network namespaces (ip, unshare, nsenter)."""
    reason = _check_netns()
    require(reason is None, reason or "")


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def nobody_can_run(code: str) -> bool:
    """Whether uid 65534 can run this Python snippet here (checkout and venv readable)."""
    probe = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", code],
        check=False,
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return probe.returncode == 0


def needs_live() -> None:
    """What a `live` test needs: root, BPF, network namespaces."""
    needs_root()
    needs_bpf()
    needs_netns()


# -------------------------------------------------------------------- markers

_MARKERS = (
    "live: needs root, BPF and network namespaces on this kernel",
    "optional: may legitimately skip; its skips are not turned into failures under CI=true",
    "needs_root: needs euid 0 (skips locally, fails under CI=true)",
    "needs_bpf: needs root, kernel BTF and the bpf() syscall (skips locally, fails under CI=true)",
    "needs_netns: needs to create network namespaces (skips locally, fails under CI=true)",
    "needs_binary(*names): needs these programs on PATH (skips locally, fails under CI=true)",
)


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)


def pytest_report_header(config: pytest.Config) -> str:
    if in_ci():
        return "hairtrace policy: CI=true, skips fail unless marked @pytest.mark.optional"
    return "hairtrace policy: CI unset, unmet requirements skip"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("live"):
        needs_live()
    if item.get_closest_marker("needs_root"):
        needs_root()
    if item.get_closest_marker("needs_bpf"):
        needs_bpf()
    if item.get_closest_marker("needs_netns"):
        needs_netns()
    for mark in item.iter_markers("needs_binary"):
        for name in mark.args:
            needs_binary(name)


def _skip_reason(longrepr: object) -> str:
    # a skip's longrepr is (path, lineno, "Skipped: reason")
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if not (in_ci() and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    if item.get_closest_marker("optional"):
        return
    rep.outcome = "failed"
    rep.longrepr = (
        f"skipped under CI=true, which counts as a failure ({rep.when}): "
        f"{_skip_reason(rep.longrepr)}\n"
        "Install what the test needs in scripts/setup, or mark the test "
        "@pytest.mark.optional if it may legitimately skip."
    )


class _SkippedAtCollection(pytest.Item):
    """Stands for a module (or class) that skipped itself at collection under CI=true."""

    def __init__(self, *, reason: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.reason = reason

    def runtest(self) -> None:
        pytest.fail(
            f"{self.parent.nodeid if self.parent else ''} skipped at collection under CI=true, "
            f"which counts as a failure: {self.reason}",
            pytrace=False,
        )

    def reportinfo(self):  # type: ignore[no-untyped-def]
        return self.path, None, self.name


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if not (in_ci() and rep.skipped):
        return
    # Turn the skipped collector into one failing test, so the run goes on
    # and the failure is counted and shown with its reason.
    item = _SkippedAtCollection.from_parent(
        collector, name="[skipped at collection]", reason=_skip_reason(rep.longrepr)
    )
    rep.outcome = "passed"
    rep.longrepr = None
    rep.result = [item]


# ------------------------------------------------------------------- fixtures


@pytest.fixture(name="require", scope="session")
def _require_fixture():  # type: ignore[no-untyped-def]
    """The `require(condition, reason)` function."""
    return require


@pytest.fixture(scope="session")
def ci() -> bool:
    """Whether the strict CI policy is in force."""
    return in_ci()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Root of the hairtrace checkout."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    """The compiled BPF object ($HAIRTRACE_BPF_OBJ, else bpf/build/hairtrace.bpf.o)."""
    env = os.environ.get("HAIRTRACE_BPF_OBJ")
    path = Path(env) if env else DEFAULT_BPF_OBJECT
    require(path.is_file(), f"BPF object {path} not built (run scripts/setup or make -C bpf)")
    return path
