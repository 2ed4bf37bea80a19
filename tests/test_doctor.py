"""`hairtrace doctor` on this kernel, with a lab namespace to look at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_live

ROOT = Path(__file__).resolve().parent.parent


def test_doctor_reports_kernel_functions_and_namespaces() -> None:
    needs_live()
    lab = ["bash", str(ROOT / "scripts" / "seed-lab.sh")]
    subprocess.run([*lab, "down"], check=True, capture_output=True)
    subprocess.run([*lab, "up", "0"], check=True, capture_output=True)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "tracer.cli", "doctor", "--json"],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        text = subprocess.run(
            [sys.executable, "-m", "tracer.cli", "doctor"],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    finally:
        subprocess.run([*lab, "down"], check=True, capture_output=True)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["features"]["btf"] and d["features"]["ringbuf"]
    # This project's kernel: fentry refused, no kprobes, so auto = tracepoint, with reasons.
    if not d["features"]["fentry"]:
        assert d["missing"]["fentry"]
    if (
        d["features"]["netfilter_link"]
        and not d["features"]["fentry"]
        and not d["features"]["kprobes"]
    ):
        assert d["auto"]["provider"] == "tracepoint"
    assert d["backend"]["backend"] == "core"  # BTF is there (asserted above): auto takes CO-RE
    # the object a trace loads: direct reads where the kernel has bpf_rdonly_cast (6.2+)
    has_cast = b"\0bpf_rdonly_cast\0" in Path("/sys/kernel/btf/vmlinux").read_bytes()
    assert d["features"]["direct_reads"] == has_cast
    if not os.environ.get("HAIRTRACE_BPF_OBJ"):
        want = "hairtrace.bpf.o" if has_cast else "hairtrace-copy.bpf.o"
        assert Path(d["bpf"]["object"]).name == want
    assert "auto backend: core" in text.stdout
    assert d["functions"]["br_forward"]["present"]
    assert d["functions"]["nf_nat_manip_pkt"]["btf"]
    node = next(ns for ns in d["namespaces"] if ns["name"] == "node")
    assert node["br_netfilter"] and node["bridge_nf_call_iptables"] == "0"
    assert node["ip_forward"] == "1"
    ports = {p["port"]: p["hairpin"] for p in node["bridges"]["cni0"]}
    assert set(ports) == {"veth-poda", "veth-podb"}
    assert text.returncode == 0 and "auto provider:" in text.stdout
    assert "bridge cni0:" in text.stdout
