"""The node-agent container image (issue 14.4): scripts/build-image makes
localhost/hairtrace:<version> from Debian's packages (mmdebstrap) and the wheel, podman
runs it as a node agent (host network and PID namespace, CAP_SYS_ADMIN and CAP_NET_ADMIN, the
kernel's BTF, /run/netns and /var/lib/cni mounted read-only) and, from inside the
container, it traces the seed lab built outside it and gives the seed diagnosis.

Slow: the module builds the image once (about 1.5 minutes with a warm wheelhouse, plus
`podman save`); the wheelhouse is the checkout's dist/wheelhouse, so PyPI is contacted
only on the first run on a machine. No registry is contacted and no image is pulled.

Containers run with `--runtime runc` (crun cannot run on a cgroup v1 hybrid host) and
with nofile/nproc limits lowered to 1024 (podman would otherwise try to raise them,
which needs CAP_SYS_RESOURCE), always with `--network host`: podman never sets up a
network, and the test checks that the host's links, ip_forward and rules are the same
after the runs as before.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
import tomllib
from pathlib import Path

import pytest
from conftest import needs_binary, needs_live

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parent.parent
BUILD_IMAGE = ROOT / "scripts" / "build-image"
SEED_LAB = ROOT / "scripts" / "seed-lab.sh"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"localhost/hairtrace:{VERSION}"
SVC = "100.67.30.133"
SITE = "/opt/hairtrace/lib/python3.11/site-packages"


def podman_run(caps: str = "SYS_ADMIN,NET_ADMIN") -> list[str]:
    """`podman run` as a node agent; by default with the least it needs (see README,
    "Container image"): CAP_SYS_ADMIN (setns, and bpf() under the default seccomp
    profile) and CAP_NET_ADMIN (reading kube-proxy's rules)."""
    return [
        "podman", "--runtime", "runc", "run", "--rm", "--network", "host", "--pid", "host",
        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
        "--cap-drop", "all", "--cap-add", caps,
        "-v", "/sys/kernel/btf:/sys/kernel/btf:ro",
        "-v", "/run/netns:/run/netns:ro,rslave",
    ]  # fmt: skip


RUN = podman_run()


def _host_net_state() -> dict[str, object]:
    """What a container run must not change in the host's network namespace."""

    def out(*argv: str) -> str:
        res = subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=30)
        return res.stdout

    # iptables-save's comment lines carry a timestamp
    rules = [line for line in out("iptables-save").splitlines() if not line.startswith("#")]
    return {
        "links": sorted(line.split()[0] for line in out("ip", "-br", "link").splitlines()),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        "iptables": rules,
        "nft": out("nft", "list", "ruleset"),
    }


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, float]:
    """Build the image once: (its name, the `podman save` archive, seconds taken)."""
    for tool in ("podman", "runc", "mmdebstrap", "iptables-save", "nft"):
        needs_binary(tool)
    out = tmp_path_factory.mktemp("image")
    saved = out / "hairtrace.tar"
    start = time.monotonic()
    res = subprocess.run(
        ["bash", str(BUILD_IMAGE), "--out", str(out), "--wheelhouse",
         str(ROOT / "dist" / "wheelhouse"), "--save", str(saved)],
        check=False, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    took = time.monotonic() - start
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.splitlines()[-1] == IMAGE, res.stdout
    return IMAGE, saved, took


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=timeout)


def test_build_script_usage() -> None:
    res = _run("bash", str(BUILD_IMAGE), "--bogus")
    assert res.returncode == 2
    assert "unknown argument --bogus" in res.stderr and "usage:" in res.stderr
    assert _run("bash", "-n", str(BUILD_IMAGE)).returncode == 0


def test_image_is_debian_plus_the_wheel(image: tuple[str, Path, float]) -> None:
    name, saved, took = image
    print(f"image built and saved in {took:.0f} s")
    info = json.loads(_run("podman", "image", "inspect", name).stdout)[0]
    assert info["Config"]["Entrypoint"] == ["/opt/hairtrace/bin/hairtrace"]
    assert info["Config"]["Labels"]["org.opencontainers.image.version"] == VERSION
    # one layer, made by podman import (no base image)
    assert len(info["RootFS"]["Layers"]) == 1
    with tarfile.open(saved) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == [name]

    script = (
        ". /etc/os-release; echo $VERSION_CODENAME; "
        "dpkg-query -W -f '${Package}\\n' python3 python3-venv libbpf1 iproute2 iptables "
        "nftables; ls /opt/hairtrace/bin/hairtrace; command -v clang gcc pip3 || true"
    )
    res = _run(*RUN, "--entrypoint", "/bin/sh", name, "-c", script)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[0] == "bookworm"
    assert sorted(lines[1:7]) == sorted(
        ["python3", "python3-venv", "libbpf1", "iproute2", "iptables", "nftables"]
    )
    assert lines[7:] == ["/opt/hairtrace/bin/hairtrace"]  # no compiler, no system pip


def test_image_version_and_doctor(image: tuple[str, Path, float]) -> None:
    name = image[0]
    before = _host_net_state()
    res = _run(*RUN, name, "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"hairtrace, version {VERSION}"
    res = _run(*RUN, name, "doctor", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["bpf"]["object"] == f"{SITE}/tracer/bpf/hairtrace.bpf.o"
    assert d["bpf"]["object_from"] == "package" and d["bpf"]["source_from"] == "package"
    assert d["backend"]["backend"] == "core" and d["features"]["btf"]
    assert d["features"]["privileged"] and d["auto"]["provider"]
    assert _host_net_state() == before


def _lab(action: str, *args: str) -> None:
    subprocess.run(["bash", str(SEED_LAB), action, *args], check=True, capture_output=True,
                   timeout=60)  # fmt: skip


def _trace_in_container(name: str, out: Path, extra: list[str]) -> tuple[int, str, bool]:
    """Trace the seed lab from a container; curl from the host once it is attached.
    Returns (the container's exit status, its stderr, whether the trace got ready)."""
    os.chmod(out, 0o777)
    proc = subprocess.Popen(
        [*RUN, *extra, "-v", f"{out}:/out", name,
         "--svc", "prod/export", "--netns", "node", "--duration", "8", "--no-live",
         "--ready-file", "/out/ready", "--json", "/out/r.json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (out / "ready").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the container's trace never got ready"
            time.sleep(0.1)
        ready = (out / "ready").exists()
        if ready:
            curl = _run("ip", "netns", "exec", "poda", "curl", "-sS", "-m", "3", "-o",
                        "/dev/null", f"http://{SVC}/", timeout=30)  # fmt: skip
            assert curl.returncode == 28, curl.stderr  # the seed bug: it times out
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr, ready


def test_container_traces_the_seed_lab(image: tuple[str, Path, float], tmp_path: Path) -> None:
    needs_live()
    name = image[0]
    before = _host_net_state()
    _lab("down")
    _lab("up", "0")
    try:
        start = time.monotonic()
        # libcni's cache exists on a node that has run pods; podman refuses to mount a
        # missing path (a fresh machine before any runtime lab has none)
        cni = ["-v", "/var/lib/cni:/var/lib/cni:ro"] if Path("/var/lib/cni").is_dir() else []
        rc, stderr, ready = _trace_in_container(name, tmp_path, cni)
        print(f"trace from the container: {time.monotonic() - start:.1f} s")
    finally:
        _lab("down")
    assert ready and rc == 3, stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["schema"] == "hairtrace/report@1" and r["events"] > 0
    [conn] = r["connections"]
    assert conn["verdict"] == "broken"
    assert conn["break"]["cause"] == "bridge-nf-call-iptables-off"
    assert conn["break"]["netns"] == "node" and conn["break"]["dev"] == "cni0"
    assert (r["service"]["ip"], r["service"]["name"]) == (SVC, "prod/export"), "rules read"
    assert r["service"]["ports_in_rules"] == ["80/tcp"]
    assert _host_net_state() == before


def test_reading_the_rules_needs_net_admin(image: tuple[str, Path, float]) -> None:
    """With CAP_SYS_ADMIN alone the probes load, but iptables-save and nft may not list
    the node's rules: a Service by name cannot be resolved (usage error, status 2)."""
    needs_live()
    _lab("down")
    _lab("up", "0")
    try:
        res = _run(*podman_run("SYS_ADMIN"), image[0], "--svc", "prod/export", "--netns",
                   "node", "--duration", "1", "--no-live")  # fmt: skip
    finally:
        _lab("down")
    assert res.returncode == 2, res.stderr
    assert "no kube-proxy rules" in res.stderr


def test_sys_admin_is_needed(image: tuple[str, Path, float], tmp_path: Path) -> None:
    """Without CAP_SYS_ADMIN (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN instead) the default
    seccomp profile refuses bpf(): the tracer stops with status 1 before attaching."""
    needs_live()
    name = image[0]
    res = _run(*podman_run("BPF,PERFMON,NET_ADMIN"), name, "--svc", SVC, "--duration", "1",
               "--no-live")  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "hairtrace: error:" in res.stderr
