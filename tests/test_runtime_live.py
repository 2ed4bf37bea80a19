"""Issue 14.2 end to end: pods made by a real container runtime (Debian's containerd, its
CRI plugin, driven the way the kubelet does by tracer.lab.runtime) are named in the seed
diagnosis, the live view's summary, the report, the recorded session's replay and the
export, from what the node keeps (libcni's result cache), with no API access."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_binary, needs_live

ROOT = Path(__file__).resolve().parent.parent
HAIRTRACE = str(ROOT / ".venv" / "bin" / "hairtrace")
CLIENT, BACKEND = "prod/curl-5c8d9-q7x2p", "prod/export-7d9f5-x2k8q"

pytestmark = pytest.mark.live


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HAIRTRACE, *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


@pytest.fixture
def runtime_lab(request: pytest.FixtureRequest) -> Any:
    needs_live()
    for tool in ("containerd", "ctr", "runc", "curl"):
        needs_binary(tool)
    pytest.importorskip("grpc", reason="the runtime lab drives the CRI with grpcio")
    knob = getattr(request, "param", 0)
    _run("lab", "down")
    host = _host_state()
    up = _run("lab", "up", "--runtime", "containerd", "--bridge-nf-call-iptables", str(knob))
    try:
        assert up.returncode == 0, up.stderr
        from tracer.lab import runtime

        lab = runtime.load()
        assert lab is not None and [p.pod for p in lab.pods] == [CLIENT, BACKEND]
        yield lab
    finally:
        down = _run("lab", "down")
        assert down.returncode == 0, down.stderr
    assert not list(Path("/var/lib/cni/results").glob("hairtrace-pods-*")), "CNI DEL ran"
    assert _host_state() == host, "the lab and its runtime left the host's network alone"


def _host_state() -> tuple[str, ...]:
    """The host netns's devices, forwarding sysctl and rules (what a runtime could touch)."""
    out = [
        subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        for argv in (["ip", "-br", "link"], ["iptables-save"], ["nft", "list", "ruleset"])
    ]
    return (*(re.sub(r"^#.*$", "", o, flags=re.MULTILINE) for o in out),
            Path("/proc/sys/net/ipv4/ip_forward").read_text())  # fmt: skip


@pytest.mark.parametrize("runtime_lab", [0], indirect=True)
def test_the_seed_diagnosis_names_the_runtimes_pods(runtime_lab: Any, tmp_path: Path) -> None:
    from tracer.lab import runtime

    lab = runtime_lab
    report, session = tmp_path / "r.json", tmp_path / "s.hts"
    res = _run("--no-live", "--svc", "prod/export", "--netns", lab.node_ns, "--json",
               str(report), "--record", str(session), "--",
               *runtime.curl_argv(lab, "http://100.67.30.133/"))  # fmt: skip
    assert res.returncode == 3, res.stderr[-3000:]
    r = json.loads(report.read_text())
    [conn] = r["connections"]
    assert conn["client"] == {"ip": lab.client.ip, "port": conn["client"]["port"], "pod": CLIENT}
    assert conn["backend"] == {"ip": lab.backend.ip, "port": 80, "pod": BACKEND}
    assert (conn["verdict"], conn["break"]["cause"]) == ("broken", "bridge-nf-call-iptables-off")
    assert r["service"]["endpoints_in_rules"] == [{"ip": lab.backend.ip, "port": 80,
                                                   "proto": "tcp"}]  # fmt: skip
    hops = [h for p in conn["packets"] for h in p["hops"]]
    by_netns = {h["netns"]: h["pod"] for h in hops}
    assert by_netns == {lab.client.netns: CLIENT, lab.backend.netns: BACKEND, lab.node_ns: None}
    behind = {h["dev"]: h["dev_pod"] for h in hops if h["netns"] == lab.node_ns}
    assert behind.pop("cni0") is None
    assert sorted(behind.values()) == [CLIENT, BACKEND], "each host veth leads to its pod"
    assert CLIENT in res.stderr and BACKEND in res.stderr, "the summary names both pods"

    replayed = _run("replay", str(session), "--json", "-")
    assert replayed.returncode == 3, replayed.stderr
    [again] = json.loads(replayed.stdout)["connections"]
    assert (again["client"]["pod"], again["backend"]["pod"]) == (CLIENT, BACKEND)
    assert again["packets"] == conn["packets"], "names are stored in the session"

    exported = _run("export", str(session), "--format", "csv", "--out", "-")
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert {(row["netns_name"], row["pod"]) for row in rows} == {
        (lab.client.netns, CLIENT),
        (lab.backend.netns, BACKEND),
        (lab.node_ns, ""),
    }


@pytest.mark.parametrize("runtime_lab", [1], indirect=True)
def test_healthy_calls_between_the_runtimes_pods_are_ok(runtime_lab: Any, tmp_path: Path) -> None:
    from tracer.lab import runtime

    lab = runtime_lab
    report = tmp_path / "r.json"
    curls = " && ".join(" ".join(runtime.curl_argv(lab, "http://100.67.30.133/"))
                        for _ in range(3))  # fmt: skip
    res = _run("--no-live", "--svc", "prod/export:80", "--netns", lab.node_ns, "--json",
               str(report), "--", "sh", "-c", curls)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("200") == 3
    conns = json.loads(report.read_text())["connections"]
    assert [(c["verdict"], c["client"]["pod"], c["backend"]["pod"]) for c in conns] == [
        ("ok", CLIENT, BACKEND)
    ] * 3
