"""Provider choice and skipping, on synthetic feature sets (no kernel needed)."""

from __future__ import annotations

import pytest

from tracer.errors import HairtraceError, UsageError
from tracer.kernel.features import Features
from tracer.kernel.providers import FUNCTIONS, FunctionProvider, choose


def feats(**missing: str) -> Features:
    return Features(
        "6.x",
        "privileges" not in missing,
        "btf" not in missing,
        True,
        True,
        True,
        "kprobes" not in missing,
        "fentry" not in missing,
        dict(missing),
    )


def test_auto_prefers_fentry() -> None:
    provider, why = choose("auto", feats())
    assert provider.name == "fentry" and "auto" in why


def test_auto_falls_back_and_says_why() -> None:
    provider, why = choose("auto", feats(fentry="refused (EPERM)"))
    assert provider.name == "kprobe" and "fentry: refused (EPERM)" in why
    provider, why = choose("auto", feats(fentry="refused", kprobes="no CONFIG_KPROBES"))
    assert provider.name == "tracepoint"
    assert "fentry: refused" in why and "kprobe: no CONFIG_KPROBES" in why


def test_explicit_choice_that_cannot_run_is_an_error_with_the_reason() -> None:
    with pytest.raises(HairtraceError, match="provider fentry cannot run here: refused"):
        choose("fentry", feats(fentry="refused"))
    with pytest.raises(UsageError, match="unknown provider"):
        choose("ebpf", feats())


def test_no_privileges_or_btf_fail_first() -> None:
    with pytest.raises(HairtraceError, match="not root"):
        choose("auto", feats(privileges="not root"))
    with pytest.raises(HairtraceError, match="no kernel BTF"):
        choose("auto", feats(btf="no kernel BTF at x"))


def test_a_function_program_that_fails_to_load_is_skipped_with_the_log_line() -> None:
    p = FunctionProvider("fentry")
    p._programs = {f.fentry: f.function for f in FUNCTIONS if f.fentry}
    log = (
        "libbpf: prog 'ht_fe_br_pass_up': failed to find kernel BTF type ID of "
        "'br_pass_frame_up': -3\nlibbpf: failed to load object 'x.o'\n"
    )
    assert p.exclude_failed(log)
    assert "ht_fe_br_pass_up" not in p._programs
    assert "br_pass_frame_up" in p.skipped["br_pass_frame_up"]
    assert not p.exclude_failed("libbpf: something else failed\n")


def test_every_function_of_the_design_has_programs() -> None:
    names = {f.function for f in FUNCTIONS}
    assert {
        "br_forward",
        "br_handle_frame",
        "br_nf_pre_routing",
        "nf_conntrack_in",
        "__nf_conntrack_confirm",
        "nf_nat_manip_pkt",
        "tcp_v4_send_reset",
    } <= names
    assert all(f.kprobe for f in FUNCTIONS if f.function != "nf_nat_setup_info")
    assert all(f.fentry for f in FUNCTIONS)


def test_the_skip_reason_quotes_the_verifier() -> None:
    p = FunctionProvider("fentry")
    p._programs = {"ht_fe_br_handle_frame": "br_handle_frame"}
    log = (
        "libbpf: prog 'ht_fe_br_handle_frame': BPF program load failed: Permission denied\n"
        "libbpf: prog 'ht_fe_br_handle_frame': -- BEGIN PROG LOAD LOG --\n"
        "0: (79) r3 = *(u64 *)(r1 +0)\n"
        "func 'br_handle_frame' arg0 type PTR is not a struct\n"
        "invalid bpf_context access off=0 size=8\n"
        "processed 1 insns (limit 1000000) max_states_per_insn 0\n"
    )
    assert p.exclude_failed(log)
    assert "arg0 type PTR is not a struct" in p.skipped["br_handle_frame"]


def test_external_btf_on_a_kernel_without_btf_takes_kprobes_and_raw_tracepoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--btf FILE: tp_btf, fentry and netfilter need the kernel's own BTF; kprobes run with
    the raw-tracepoint twins of the device and drop tracepoints."""
    from tracer.kernel import providers

    no_btf = feats(btf="no kernel BTF at /sys/kernel/btf/vmlinux")
    provider, why = choose("auto", no_btf, custom_btf=True)
    assert provider.name == "kprobe" and "fentry" in why
    assert isinstance(provider, FunctionProvider)
    assert provider.tracepoints == ("ht_rtp_dev_rx", "ht_rtp_dev_tx", "ht_rtp_drop")
    monkeypatch.setattr(providers, "kfree_skb_has_reason", lambda: False)  # before 5.17
    provider, _why = choose("kprobe", no_btf, custom_btf=True)
    assert isinstance(provider, FunctionProvider)
    assert provider.tracepoints[-1] == "ht_rtp_drop_noreason"
    with pytest.raises(HairtraceError, match="tp_btf needs the kernel's own BTF"):
        choose("tracepoint", no_btf, custom_btf=True)
    # with the kernel's own BTF, the tp_btf programs as always
    provider, _why = choose("kprobe", feats(fentry="refused"))
    assert isinstance(provider, FunctionProvider)
    assert provider.tracepoints == ("ht_dev_rx", "ht_dev_tx", "ht_drop")
