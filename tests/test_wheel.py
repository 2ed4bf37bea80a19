"""An install a node accepts (issue 14.3): the wheel scripts/build-wheel makes carries the
prebuilt CO-RE object and the bcc sources, and a fresh virtual environment with only that
wheel installed runs `hairtrace doctor` and traces the seed lab, with the checkout off
sys.path, HAIRTRACE_BPF_OBJ unset and no compiler called.

The fresh venv is a plain `python -m venv` (no system site-packages) with the wheel
installed by `pip install --no-deps --no-index`; its dependencies (click, numpy, ...) come
from this checkout's .venv through a .pth file, a directory of installed packages only
(the editable install's own .pth and finder there are not run: a .pth line adds a path,
it does not process that path's .pth files). The tracer package, the object and the
sources all come from the new venv's site-packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import needs_live

ROOT = Path(__file__).resolve().parent.parent
BUILD_WHEEL = ROOT / "scripts" / "build-wheel"
SEED_LAB = ROOT / "scripts" / "seed-lab.sh"
SVC = "100.67.30.133"
BPF_OBJECTS = ("hairtrace.bpf.o", "hairtrace-copy.bpf.o")  # direct reads; helper copies
BCC_FILES = ("hairtrace.bpf.c", "compat.h", "hairtrace.h")
BPF_FILES = BPF_OBJECTS + BCC_FILES
RUNTIME_DEPS = {"click", "rich", "numpy", "pandas", "pyroute2", "pyarrow", "prometheus-client"}
# Programs the runtime must never run: stand-ins for them come first on PATH and log a call.
TRIPWIRES = ("clang", "clang-14", "llc", "gcc", "cc", "make", "bpftool", "qemu-system-x86_64")


def _build(
    *args: str, out: Path, script: Path = BUILD_WHEEL, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args, "-o", str(out)],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    res = _build(out=out)
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.is_file(), res.stdout
    assert [p.name for p in out.iterdir()] == [path.name]
    return path


def test_wheel_carries_the_object_and_the_bcc_sources(wheel: Path) -> None:
    assert wheel.name == "hairtrace-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        obj = z.read("tracer/bpf/hairtrace.bpf.o")
        for name in BCC_FILES:
            assert z.read(f"tracer/bpf/{name}") == (ROOT / "bpf" / name).read_bytes()
        meta = z.read("hairtrace-0.1.0.dist-info/METADATA").decode()
        entry = z.read("hairtrace-0.1.0.dist-info/entry_points.txt").decode()
        copy_obj = z.read("tracer/bpf/hairtrace-copy.bpf.o")
    assert obj == (ROOT / "bpf" / "build" / "hairtrace.bpf.o").read_bytes()
    assert copy_obj == (ROOT / "bpf" / "build" / "hairtrace-copy.bpf.o").read_bytes() != obj
    assert obj[:4] == b"\x7fELF"
    # every package of the tree, nothing outside tracer/ and the dist-info
    for init in (ROOT / "tracer").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names
    assert {n.split("/")[0] for n in names} == {"tracer", "hairtrace-0.1.0.dist-info"}
    # labs', tests' and build-only files stay out: fixtures, the kernel's vmlinux.h, the
    # benchmark's BPF object and C sources, caches
    assert not [n for n in names if n.endswith((".hts", ".pyc", ".c", ".o", ".h"))
                and not n.startswith("tracer/bpf/")]  # fmt: skip
    assert sorted(n for n in names if n.startswith("tracer/bpf/")) == sorted(
        f"tracer/bpf/{n}" for n in BPF_FILES
    )
    assert "vmlinux.h" not in " ".join(names) and "__pycache__" not in " ".join(names)
    # runtime dependencies: the runtime's, the test tools only under the extra
    required = {
        line.split(":", 1)[1].split(">")[0].split(";")[0].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert required == RUNTIME_DEPS
    assert "hairtrace = tracer.cli:main" in entry


def _fake_checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(BUILD_WHEEL, repo / "scripts" / "build-wheel")
    (repo / "bpf" / "build").mkdir(parents=True)
    for name in BCC_FILES:
        shutil.copy2(ROOT / "bpf" / name, repo / "bpf" / name)
    return repo


def test_build_refuses_a_missing_or_stale_object(tmp_path: Path) -> None:
    repo = _fake_checkout(tmp_path)
    script, out = repo / "scripts" / "build-wheel", tmp_path / "out"
    env = {"PYTHON": sys.executable}
    res = _build("--no-make", out=out, script=script, env=env)
    assert res.returncode != 0 and not out.exists()
    assert res.stderr.count("\n") == 1 and "hairtrace.bpf.o missing" in res.stderr, res.stderr

    obj = repo / "bpf" / "build" / "hairtrace.bpf.o"
    shutil.copy2(ROOT / "bpf" / "build" / "hairtrace.bpf.o", obj)
    src = repo / "bpf" / "hairtrace.bpf.c"
    os.utime(obj, (1_000_000_000, 1_000_000_000))
    os.utime(src, (1_000_000_100, 1_000_000_100))
    res = _build("--no-make", out=out, script=script, env=env)
    assert res.returncode != 0 and not out.exists()
    assert res.stderr.count("\n") == 1, res.stderr
    assert "older than bpf/hairtrace.bpf.c" in res.stderr and "make -C bpf" in res.stderr


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("node") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter .venv was made of
    subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    site = _site(venv)
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_hairtrace_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return venv


def _site(venv: Path) -> Path:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True, cwd="/",
    ).stdout  # fmt: skip
    return Path(out.strip())


@pytest.fixture(scope="module")
def node_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    """The environment the new venv's commands run in (no checkout, no object override, the
    compilers replaced by tripwires) and the tripwires' log."""
    wires = tmp_path_factory.mktemp("tripwires")
    log = wires / "called.log"
    for name in TRIPWIRES:
        tool = wires / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit 127\n')
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in {"HAIRTRACE_BPF_OBJ", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}  # fmt: skip
    env["PATH"] = os.pathsep.join([str(wires), env.get("PATH", os.defpath)])
    return env, log


def _run(venv: Path, node: tuple[dict[str, str], Path], cwd: Path, *argv: str,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """NEWVENV/bin/ARGV[0] ARGV[1:] in cwd (outside the checkout); fails if it ran a build
    tool."""
    env, log = node
    res = subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
    )  # fmt: skip
    assert not log.exists(), f"the runtime ran a build tool: {log.read_text()}"
    return res


LOOKUP = """\
import importlib.util, json, sys
import tracer
from tracer.kernel import objfile
obj, obj_from = objfile.find_object()
src, src_from = objfile.find_source()
print(json.dumps({"tracer": tracer.__file__, "spec": importlib.util.find_spec("tracer").origin,
                  "object": str(obj), "object_from": obj_from,
                  "source": str(src), "source_from": src_from, "path": sys.path}))
"""


def test_fresh_venv_finds_the_packaged_object(
    fresh_venv: Path, node_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    res = _run(fresh_venv, node_env, tmp_path, "python", "-c", LOOKUP)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    site = _site(fresh_venv)
    assert d["tracer"] == d["spec"] == str(site / "tracer" / "__init__.py")
    assert (d["object"], d["object_from"]) == (str(site / "tracer/bpf/hairtrace.bpf.o"), "package")
    assert (d["source"], d["source_from"]) == (str(site / "tracer/bpf/hairtrace.bpf.c"), "package")
    assert Path(d["object"]).read_bytes() == (ROOT / "bpf/build/hairtrace.bpf.o").read_bytes()
    # the checkout is not on sys.path: only its .venv's installed packages (the dependencies)
    for entry in d["path"]:
        p = Path(entry or tmp_path).resolve()
        assert not p.is_relative_to(ROOT) or p.is_relative_to(ROOT / ".venv"), entry


@pytest.mark.live
def test_fresh_venv_doctor(
    fresh_venv: Path, node_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    res = _run(fresh_venv, node_env, tmp_path, "hairtrace", "doctor", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    site = _site(fresh_venv)
    assert d["bpf"]["object"] == str(site / "tracer" / "bpf" / "hairtrace.bpf.o")
    assert d["bpf"]["object_from"] == "package" and d["bpf"]["source_from"] == "package"
    assert d["backend"]["backend"] == "core" and d["auto"]["provider"]
    text = _run(fresh_venv, node_env, tmp_path, "hairtrace", "doctor")
    assert text.returncode == 0, text.stderr
    assert f"BPF object: {site}/tracer/bpf/hairtrace.bpf.o (package)" in text.stdout


def _lab(action: str, *args: str) -> None:
    subprocess.run(["bash", str(SEED_LAB), action, *args], check=True, capture_output=True,
                   timeout=60)  # fmt: skip


@pytest.mark.live
def test_fresh_venv_traces_the_seed_lab(
    fresh_venv: Path, node_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    needs_live()
    report = tmp_path / "r.json"
    _lab("down")
    _lab("up", "0")
    try:
        res = _run(
            fresh_venv, node_env, tmp_path,
            "hairtrace", "--no-live", "--svc", SVC, "--netns", "node", "--json", report.name,
            "--", "ip", "netns", "exec", "poda", "curl", "-sS", "-m", "3", "-o", "/dev/null",
            f"http://{SVC}/",
        )  # fmt: skip
    finally:
        _lab("down")
    assert res.returncode == 3, res.stderr
    r = json.loads(report.read_text())
    assert r["schema"] == "hairtrace/report@1" and r["events"] > 0
    [conn] = r["connections"]
    assert conn["verdict"] == "broken"
    assert conn["break"]["cause"] == "bridge-nf-call-iptables-off"
    assert conn["break"]["netns"] == "node" and conn["break"]["dev"] == "cni0"
