"""The seed scenario on a Debian 6.1 kernel under qemu, with the fentry and kprobe providers.

One VM boot runs all four cases (provider x bridge-nf-call-iptables) through
scripts/scenario-seed, the same script the host runs; each prints its JSON report.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_binary, needs_live

ROOT = Path(__file__).resolve().parent.parent
VIP = "100.67.30.133:80"
CONNTRACK_NAT = {"nf_conntrack_in", "__nf_conntrack_confirm", "nf_nat_manip_pkt"}
CASES = [(p, k) for p in ("fentry", "kprobe") for k in ("0", "1")]
# the seed case over UDP: one dig to the lab's kube-dns Service (SEED_CLIENT=dig)
DNS = "100.67.30.140:53"
UDP_CASES = [(p, f"{k}/udp") for p in ("fentry", "kprobe") for k in ("0", "1")]
# A kernel without BTF of its own (simulated: hairtrace is told its BTF is absent),
# traced with --btf FILE: CO-RE relocations from the file, kprobes, and the
# raw-tracepoint twins of the device and drop tracepoints (tp_btf needs kernel BTF).
NO_BTF = ("kprobe --btf", "0")
NO_BTF_RUN = (
    "HAIRTRACE_KERNEL_BTF=/nonexistent scripts/scenario-seed 0 --provider kprobe "
    "--btf /sys/kernel/btf/vmlinux; echo"
)

pytestmark = pytest.mark.live


def _documents(text: str) -> list[dict[str, Any]]:
    dec, i, docs = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return docs
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)


@pytest.fixture(scope="module")
def vm_reports() -> dict[tuple[str, str], dict[str, Any]]:
    needs_live()
    needs_binary("qemu-system-x86_64")
    runs = [f"scripts/scenario-seed {k} --provider {p}; echo" for p, k in CASES]
    runs += [
        f"SEED_CLIENT=dig scripts/scenario-seed {k.split('/')[0]} --provider {p}; echo"
        for p, k in UDP_CASES
    ]
    script = "; ".join([*runs, NO_BTF_RUN])
    res = subprocess.run(
        [str(ROOT / "scripts" / "vm-run"), "--timeout", "1500", "--", "sh", "-c", script],
        check=False, capture_output=True, text=True, timeout=1600, cwd=ROOT,
    )  # fmt: skip
    docs = _documents(res.stdout)
    want = len(CASES) + len(UDP_CASES) + 1
    assert len(docs) == want, f"vm-run exit {res.returncode}: {res.stderr[-3000:]}"
    return dict(zip([*CASES, *UDP_CASES, NO_BTF], docs, strict=True))


def _only(report: dict[str, Any]) -> dict[str, Any]:
    [conn] = report["connections"]
    return conn


def _packet(conn: dict[str, Any], role: str) -> dict[str, Any]:
    return next(p for p in conn["packets"] if p["role"] == role)


@pytest.mark.parametrize("provider", ["fentry", "kprobe"])
def test_seed_broken_in_vm(vm_reports: dict[tuple[str, str], Any], provider: str) -> None:
    r = vm_reports[(provider, "0")]
    assert r["provider"] == provider and r["kernel"].startswith("6.1.")
    assert r["lost_events"] == 0
    conn = _only(r)
    assert conn["verdict"] == "broken"
    brk = conn["break"]
    assert (brk["packet_role"], brk["netns"], brk["cause"]) == (
        "SYN+ACK",
        "node",
        "bridge-nf-call-iptables-off",
    )
    syn = _packet(conn, "SYN")
    syn_points = {h["point"] for h in syn["hops"]}
    assert {"nf_conntrack_in", "nf_nat_manip_pkt"} <= syn_points
    assert any(
        h["point"] == "nf_nat_manip_pkt" and h["nat"] and "DNAT" in h["nat"] for h in syn["hops"]
    )
    synack = _packet(conn, "SYN+ACK")
    node = [h for h in synack["hops"] if h["netns"] == "node"]
    assert any(h["point"] == "br_forward" for h in node)
    assert not CONNTRACK_NAT & {h["point"] for h in node}
    assert any(h["point"] == "tcp_v4_send_reset" and h["netns"] == "poda" for h in synack["hops"])


@pytest.mark.parametrize("provider", ["fentry", "kprobe"])
def test_seed_healthy_in_vm(vm_reports: dict[tuple[str, str], Any], provider: str) -> None:
    r = vm_reports[(provider, "1")]
    assert r["provider"] == provider
    conn = _only(r)
    assert conn["verdict"] == "ok" and conn["break"] is None
    synack = _packet(conn, "SYN+ACK")
    assert any(
        h["point"] == "nf_nat_manip_pkt" and h["nat"] and h["nat"].endswith(f"-> {VIP}")
        for h in synack["hops"]
    )


@pytest.mark.parametrize("provider", ["fentry", "kprobe"])
def test_udp_seed_in_vm(vm_reports: dict[tuple[str, str], Any], provider: str) -> None:
    """The seed case over UDP (a DNS query bridged back without reverse NAT), with the
    fentry and kprobe providers: broken with bridge-nf-call-iptables=0, ok with 1."""
    broken, healthy = vm_reports[(provider, "0/udp")], vm_reports[(provider, "1/udp")]
    for r in (broken, healthy):
        assert r["provider"] == provider and r["lost_events"] == 0
        assert r["service"]["protocols"] == ["udp"]
    conn = _only(broken)
    assert (conn["proto"], conn["verdict"]) == ("udp", "broken")
    assert f"{conn['service']['ip']}:{conn['service']['port']}" == DNS
    brk = conn["break"]
    assert (brk["packet_role"], brk["netns"], brk["cause"]) == (
        "UDP",
        "node",
        "bridge-nf-call-iptables-off",
    )
    reply = next(p for p in conn["packets"] if p["role"] == "UDP" and p["direction"] == "reply")
    node = [h for h in reply["hops"] if h["netns"] == "node"]
    assert any(h["point"] == "br_forward" for h in node)
    assert not CONNTRACK_NAT & {h["point"] for h in node}
    request = conn["packets"][0]
    assert any(
        h["point"] == "nf_nat_manip_pkt" and h["nat"] and "DNAT" in h["nat"]
        for h in request["hops"]
    )
    ok = _only(healthy)
    assert (ok["proto"], ok["verdict"], ok["break"]) == ("udp", "ok", None)
    assert [x["ok"] for x in ok["exchanges"]] == [True]
    reply = next(p for p in ok["packets"] if p["direction"] == "reply")
    assert any(
        h["point"] == "nf_nat_manip_pkt" and h["nat"] and h["nat"].endswith(f"-> {DNS}")
        for h in reply["hops"]
    )


def test_seed_broken_without_kernel_btf_in_vm(vm_reports: dict[tuple[str, str], Any]) -> None:
    """--btf FILE where the kernel has no BTF: the same diagnosis as with the kernel's BTF."""
    r, ref = vm_reports[NO_BTF], vm_reports[("kprobe", "0")]
    assert r["backend"] == "core" and "--btf /sys/kernel/btf/vmlinux" in r["backend_reason"]
    assert {"ht_rtp_dev_rx", "ht_rtp_dev_tx"} <= set(r["attached"])
    assert not {"ht_dev_rx", "ht_dev_tx", "ht_drop"} & set(r["attached"])
    assert r["lost_events"] == 0
    conn, want = _only(r), _only(ref)
    assert conn["verdict"] == "broken"
    keys = ("packet_role", "netns", "dev", "point", "cause")
    assert {k: conn["break"][k] for k in keys} == {k: want["break"][k] for k in keys}
    synack = [h["point"] for h in _packet(conn, "SYN+ACK")["hops"]]
    assert {"netif_receive_skb", "br_forward", "net_dev_start_xmit"} <= set(synack), synack


def test_vm_and_host_agree(vm_reports: dict[tuple[str, str], Any]) -> None:
    """Same scenario, three providers on two kernels: same verdict and cause."""
    res = subprocess.run(
        [str(ROOT / "scripts" / "scenario-seed"), "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    host = json.loads(res.stdout)
    assert host["provider"] == "tracepoint"
    verdicts = {
        (r["provider"], _only(r)["verdict"], _only(r)["break"]["cause"])
        for (_p, k), r in vm_reports.items()
        if k == "0"
    } | {(host["provider"], _only(host)["verdict"], _only(host)["break"]["cause"])}
    assert {(v, c) for _p, v, c in verdicts} == {("broken", "bridge-nf-call-iptables-off")}
    assert {p for p, _v, _c in verdicts} == {"fentry", "kprobe", "tracepoint"}
