"""The bcc backend on a Debian 6.1 kernel under qemu, against CO-RE's kprobe provider.

One VM boot runs the seed scenario broken and healthy with `--backend bcc`
(the healthy one through the perf buffer, HAIRTRACE_BCC_PERF=1, the path of
kernels before 5.8) and with `--backend core --provider kprobe`, recording
both broken runs. Needs the VM kernel's headers package on the host (the
guest sees /lib/modules/<release>/build through the shared root) and
python3-bpfcc: `scripts/setup --with-bcc`. Under TCG, bcc's compile takes
minutes, so the cases share one boot.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_binary, needs_live, require

ROOT = Path(__file__).resolve().parent.parent
HAIRTRACE = [sys.executable, "-m", "tracer.cli"]
CASES = {
    "bcc-0": "scripts/scenario-seed 0 --backend bcc --record /tmp/bcc-0.hts",
    "bcc-1": "HAIRTRACE_BCC_PERF=1 scripts/scenario-seed 1 --backend bcc",
    "core-0": "scripts/scenario-seed 0 --backend core --provider kprobe --record /tmp/core-0.hts",
    "core-1": "scripts/scenario-seed 1 --backend core --provider kprobe",
}
RECORDINGS = ("bcc-0", "core-0")

pytestmark = pytest.mark.live


def _vm_release() -> str:
    """The release scripts/vm-run boots (what linux-image-amd64 depends on)."""
    res = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                         text=True, check=False)  # fmt: skip
    m = re.search(r"Depends:\s*linux-image-(\S+)", res.stdout)
    require(m, "apt-cache cannot resolve linux-image-amd64 (the VM kernel)")
    assert m is not None
    return m.group(1)


def _sections(text: str) -> dict[str, str]:
    """'===NAME' lines split the guest's stdout into named parts."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith("==="):
            name = line[3:].strip()
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    needs_live()
    needs_binary("qemu-system-x86_64")
    release = _vm_release()
    require(
        (Path("/lib/modules") / release / "build" / "include").is_dir(),
        f"needs linux-headers-{release} on the host (scripts/setup --with-bcc)",
    )
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    parts = [f"echo ==={name}; {cmd}; echo" for name, cmd in CASES.items()]
    parts += [f"echo ===rec-{name}; base64 -w0 /tmp/{name}.hts; echo" for name in RECORDINGS]
    # scenario-seed runs $HAIRTRACE when set (another checkout's interpreter), else .venv's
    env = ["-e", "HAIRTRACE"] if os.environ.get("HAIRTRACE") else []
    res = subprocess.run(
        [str(ROOT / "scripts" / "vm-run"), "--timeout", "1800", *env, "--", "sh", "-c",
         "; ".join(parts)],
        check=False, capture_output=True, text=True, timeout=1900, cwd=ROOT,
    )  # fmt: skip
    sec = _sections(res.stdout)
    where = f"vm-run exit {res.returncode}: {res.stderr[-3000:]}"
    reports = {name: json.loads(sec[name]) for name in CASES if sec.get(name, "").strip()}
    assert set(reports) == set(CASES), where
    out_dir = tmp_path_factory.mktemp("vm-bcc")
    for name, report in reports.items():  # kept for a look after a failure
        (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1))
    recordings = {}
    for name in RECORDINGS:
        path = out_dir / f"{name}.hts"
        path.write_bytes(base64.b64decode(sec.get(f"rec-{name}", "").strip()))
        assert path.stat().st_size > 0, where
        recordings[name] = path
    return {"reports": reports, "recordings": recordings}


def _conn(report: dict[str, Any]) -> dict[str, Any]:
    [conn] = report["connections"]
    return conn


# The design's kernel functions whose hops carry the diagnosis. Left out:
# br_dev_xmit, and the device points, which depend on whether the node's
# neighbour entry for the backend is still fresh when the trace starts (bcc's
# compile takes minutes under TCG): br_netfilter then sends the DNATed frame
# out through the bridge device instead of straight to br_forward.
FUNCTIONS = {"br_handle_frame", "br_forward", "br_pass_frame_up", "br_nf_pre_routing",
             "nf_conntrack_in", "__nf_conntrack_confirm", "nf_nat_manip_pkt",
             "tcp_v4_send_reset"}  # fmt: skip
HANDSHAKE = ("SYN", "SYN+ACK", "RST")  # a trace's tail (FINs) may end in its grace time


def _evidence(conn: dict[str, Any]) -> dict[str, set[tuple[str, str, str, str | None]]]:
    """Per handshake packet role: the function-level hops (netns, dev, point, NAT) seen."""
    out: dict[str, set[tuple[str, str, str, str | None]]] = {}
    for p in conn["packets"]:
        if p["role"] in HANDSHAKE:
            out.setdefault(p["role"], set()).update(
                (h["netns"], h["dev"], h["point"], h["nat"])
                for h in p["hops"]
                if h["point"] in FUNCTIONS
            )
    return out


@pytest.mark.parametrize("knob", ["0", "1"])
def test_bcc_and_core_kprobe_agree(vm: dict[str, Any], knob: str) -> None:
    bcc, core = vm["reports"][f"bcc-{knob}"], vm["reports"][f"core-{knob}"]
    assert (bcc["backend"], bcc["provider"]) == ("bcc", "kprobe")
    assert (core["backend"], core["provider"]) == ("core", "kprobe")
    assert bcc["kernel"].startswith("6.1.") and bcc["compile_seconds"] > 0
    assert bcc["lost_events"] == 0 and core["lost_events"] == 0
    assert sorted(bcc["attached"]) == sorted(core["attached"])
    b, c = _conn(bcc), _conn(core)
    assert b["verdict"] == c["verdict"] == ("broken" if knob == "0" else "ok")
    keys = ("packet_role", "netns", "dev", "point", "cause")
    if knob == "0":
        assert b["break"]["cause"] == "bridge-nf-call-iptables-off"
        assert {k: b["break"][k] for k in keys} == {k: c["break"][k] for k in keys}
    else:
        assert b["break"] is None and c["break"] is None
    eb, ec = _evidence(b), _evidence(c)
    assert eb.keys() == ec.keys() and {"SYN", "SYN+ACK"} <= eb.keys()
    for role in eb:
        assert eb[role] == ec[role], (role, eb[role] ^ ec[role])
    assert any(point == "nf_nat_manip_pkt" and nat for _n, _d, point, nat in eb["SYN"])


def test_bcc_perf_buffer_path_ran(vm: dict[str, Any]) -> None:
    r = vm["reports"]["bcc-1"]
    assert "perf buffer" in r["backend_reason"] and r["events"] > 0


def test_bcc_recording_replays_and_diffs_against_core(vm: dict[str, Any]) -> None:
    rec = vm["recordings"]
    replay = subprocess.run([*HAIRTRACE, "replay", str(rec["bcc-0"]), "--json", "-"],
                            capture_output=True, text=True, check=False, cwd=ROOT)  # fmt: skip
    report = json.loads(replay.stdout)
    assert replay.returncode == 3, replay.stderr  # broken
    assert (report["backend"], report["provider"]) == ("bcc", "kprobe")
    assert _conn(report)["break"]["cause"] == "bridge-nf-call-iptables-off"
    diff = subprocess.run([*HAIRTRACE, "diff", "--json", str(rec["bcc-0"]), str(rec["core-0"])],
                          capture_output=True, text=True, check=False, cwd=ROOT)  # fmt: skip
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert json.loads(diff.stdout)["equivalent"] is True
