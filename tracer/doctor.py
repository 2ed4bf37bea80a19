"""`hairtrace doctor`: what this kernel offers for tracing and the path state of each netns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tracer.errors import HairtraceError
from tracer.kernel import ksyms
from tracer.kernel.backends import bcc_missing, choose_backend, has_headers, headers_dir
from tracer.kernel.btf import KIND_FUNC, kernel_btf_path
from tracer.kernel.features import probe
from tracer.kernel.libbpf import Libbpf
from tracer.kernel.objfile import find_object, find_source
from tracer.kernel.providers import FUNCTIONS, choose
from tracer.topology import Topology, snapshot

BR_NF = "net.bridge.bridge-nf-call-iptables"


def _functions(lib: Libbpf, fentry_ok: bool, kprobes_ok: bool) -> dict[str, dict[str, Any]]:
    names = {f.function for f in FUNCTIONS}
    syms = ksyms.load(names)
    vmlinux = str(kernel_btf_path())
    in_btf = set(lib.btf_ids(vmlinux, names, KIND_FUNC))
    for module in {syms.module_of(n) for n in names} - {None, ""}:
        path = Path("/sys/kernel/btf") / str(module)
        if path.exists():
            in_btf |= set(lib.btf_ids(str(path), names, KIND_FUNC, base=vmlinux))
    out = {}
    for name in sorted(names):
        module = syms.module_of(name)
        out[name] = {
            "present": module is not None,
            "module": module or None,
            "btf": name in in_btf,
            "kprobe": kprobes_ok and module is not None,
            "fentry": fentry_ok and module is not None and name in in_btf,
        }
    return out


def _namespaces(topo: Topology) -> list[dict[str, Any]]:
    out = []
    for ns in topo.namespaces:
        bridges: dict[str, list[dict[str, Any]]] = {}
        for iface in ns.interfaces:
            if iface.kind == "bridge":
                bridges.setdefault(iface.name, [])
        for iface in ns.interfaces:
            if iface.master in bridges:
                bridges[iface.master].append({"port": iface.name, "hairpin": iface.hairpin})
        value = ns.sysctls.get(BR_NF)
        out.append({
            "name": ns.name, "inode": ns.inode, "br_netfilter": value is not None,
            "bridge_nf_call_iptables": value, "ip_forward": ns.sysctls.get("net.ipv4.ip_forward"),
            "bridges": bridges,
        })  # fmt: skip
    return out


def _bpf_files(direct: bool = True) -> dict[str, str | None]:
    """The CO-RE object a trace would load (direct reads or helper copies, by what the
    kernel has) and the source bcc would compile, where each was found (HAIRTRACE_BPF_OBJ,
    checkout, package) or why there is none."""
    out: dict[str, str | None] = {}
    finders = (("object", lambda: find_object(direct)), ("source", find_source))
    for key, find in finders:
        try:
            path, where = find()
            out |= {key: str(path), f"{key}_from": where, f"{key}_error": None}
        except HairtraceError as exc:
            out |= {key: None, f"{key}_from": None, f"{key}_error": str(exc)}
    return out


def diagnose_host() -> dict[str, Any]:
    """Everything `doctor` shows, as plain data (JSON-ready)."""
    lib = Libbpf()
    feats = probe(lib)
    auto: dict[str, str | None]
    try:
        provider, reason = choose("auto", feats)
        auto = {"provider": provider.name, "reason": reason}
    except HairtraceError as exc:
        auto = {"provider": None, "reason": str(exc)}
    try:
        backend, why = choose_backend("auto")
        auto_backend: dict[str, str | None] = {"backend": backend, "reason": why}
    except HairtraceError as exc:
        auto_backend = {"backend": None, "reason": str(exc)}
    return {
        "kernel": feats.kernel,
        "features": {
            "privileged": feats.privileged,
            "btf": feats.btf,
            "tp_btf": feats.tp_btf,
            "fentry": feats.fentry,
            "kprobes": feats.kprobes,
            "ringbuf": feats.ringbuf,
            "netfilter_link": feats.netfilter_link,
            "direct_reads": feats.direct_reads,
        },
        "missing": feats.missing,
        "functions": _functions(lib, feats.fentry, feats.kprobes),
        "auto": auto,
        "backend": {
            **auto_backend,
            "kernel_headers": str(headers_dir()) if has_headers() else None,
            "bcc_installed": bcc_missing() is None,
        },
        "bpf": _bpf_files(feats.direct_reads),
        "namespaces": _namespaces(snapshot("0.0.0.0", None)),
    }


def render_text(d: dict[str, Any]) -> str:
    yes = {True: "yes", False: "no"}
    lines = [f"kernel {d['kernel']}", "features:"]
    for name, ok in d["features"].items():
        why = d["missing"].get(name) or d["missing"].get(
            "privileges" if name == "privileged" else ""
        )
        lines.append(f"  {name:15} {yes[bool(ok)]}" + (f"  ({why})" if not ok and why else ""))
    lines.append("functions of the design (present / BTF / kprobe / fentry):")
    for name, f in d["functions"].items():
        where = f" [{f['module']}]" if f["module"] else ""
        lines.append(
            f"  {name:24} {yes[f['present']]:3} / {yes[f['btf']]:3} / {yes[f['kprobe']]:3} / "
            f"{yes[f['fentry']]}{where}"
        )
    auto = d["auto"]
    lines.append(
        f"auto provider: {auto['reason'] if auto['provider'] else 'none: ' + auto['reason']}"
    )
    b = d["backend"]
    lines.append(f"auto backend: {b['reason'] if b['backend'] else 'none: ' + b['reason']}")
    lines.append(
        f"  kernel headers: {b['kernel_headers'] or 'none'}; bcc: "
        + ("installed" if b["bcc_installed"] else "not installed (scripts/setup --with-bcc)")
    )
    f = d["bpf"]
    lines.append(
        f"BPF object: {f['object']} ({f['object_from']})" if f["object"]
        else f"BPF object: none: {f['object_error']}"
    )  # fmt: skip
    lines.append(
        f"  bcc source: {f['source']} ({f['source_from']})" if f["source"]
        else f"  bcc source: none: {f['source_error']}"
    )  # fmt: skip
    lines.append("network namespaces:")
    for ns in d["namespaces"]:
        brnf = ns["bridge_nf_call_iptables"] if ns["br_netfilter"] else "absent (no br_netfilter)"
        lines.append(
            f"  {ns['name']}: bridge-nf-call-iptables={brnf} ip_forward={ns['ip_forward']}"
        )
        for br, ports in ns["bridges"].items():
            desc = ", ".join(
                f"{p['port']} hairpin={'on' if p['hairpin'] else 'off'}" for p in ports
            )
            lines.append(f"    bridge {br}: {desc or 'no ports'}")
    return "\n".join(lines)
