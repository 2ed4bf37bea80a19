"""Provider choice and skipping, on synthetic feature sets (no kernel needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel.test_nfholders import NF_FDINFO, fake_proc
from tracer.errors import HairtraceError, UsageError
from tracer.kernel.features import Features
from tracer.kernel.libbpf import NetfilterBusy
from tracer.kernel.providers import (
    FUNCTIONS,
    PRI_CONNTRACK,
    PRI_FILTER,
    PRI_NAT_DST,
    PRI_NAT_SRC,
    FunctionProvider,
    TracepointProvider,
    choose,
)


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


class FakeNfObject:
    """attach / attach_netfilter as BpfObject's, with some (hook, priority) slots held
    by another tracer (EBUSY) and optionally one other failure."""

    def __init__(self, taken: set[tuple[int, int]], fail: tuple[int, int] | None = None) -> None:
        self.taken = taken
        self.fail = fail
        self.tried: list[tuple[str, int, int]] = []
        self.links: list[tuple[str, int, int]] = []

    def attach(self, name: str) -> None:
        self.links.append((name, -1, 0))

    def attach_netfilter(self, name: str, netns_path: str, hook: int, priority: int) -> None:
        self.tried.append((name, hook, priority))
        what = f"attaching netfilter program {name} (hook {hook}, priority {priority})"
        if (hook, priority) == self.fail:
            raise HairtraceError(f"{what}: Invalid argument")
        if (hook, priority) in self.taken:
            raise NetfilterBusy(f"{what}: Device or resource busy", hook, priority)
        self.links.append((name, hook, priority))


def test_one_tracer_attaches_at_the_first_choices_as_before() -> None:
    p, obj = TracepointProvider(), FakeNfObject(set())
    attached = p.attach(obj, "/run/netns/node")  # type: ignore[arg-type]
    assert attached == list(p.TRACEPOINTS) + [h.name for h in p.HOOKS]
    assert p.priorities == {
        "ht_nf_pre_ct": -199,
        "ht_nf_pre_nat": -99,
        "ht_nf_out_ct": -199,
        "ht_nf_out_nat": -99,
        "ht_nf_forward": 1,
        "ht_nf_post_nat": 101,
        "ht_nf_in_nat": 101,
    }
    assert len(obj.tried) == len(p.HOOKS), "no priority tried twice"


def test_a_held_priority_moves_to_the_next_free_one_in_the_window() -> None:
    # another tracer holds the first choices, a third one PREROUTING -198 as well
    first = {(h.hook, h.priority) for h in TracepointProvider.HOOKS}
    p, obj = TracepointProvider(), FakeNfObject(first | {(0, -198)})
    attached = p.attach(obj, "/run/netns/node")  # type: ignore[arg-type]
    assert attached == list(p.TRACEPOINTS) + [h.name for h in p.HOOKS], "same contract"
    assert p.priorities["ht_nf_pre_ct"] == -197
    assert p.priorities["ht_nf_pre_nat"] == -98
    assert p.priorities["ht_nf_out_ct"] == -198  # OUTPUT -198 is free
    assert p.priorities["ht_nf_forward"] == 2
    assert p.priorities["ht_nf_post_nat"] == p.priorities["ht_nf_in_nat"] == 102
    assert ("ht_nf_pre_ct", 0, -197) in obj.links


def test_every_window_stays_between_the_stages_it_brackets() -> None:
    windows = {h.name: (h.lo, h.hi) for h in TracepointProvider.HOOKS}
    for h in TracepointProvider.HOOKS:
        prios = h.priorities()
        assert prios[0] == h.priority and h.lo <= h.priority <= h.hi
        assert sorted(prios) == list(range(h.lo, h.hi + 1)), "each priority of the window once"
    assert (
        windows["ht_nf_pre_ct"] == windows["ht_nf_out_ct"] == (PRI_CONNTRACK + 1, PRI_NAT_DST - 1)
    )
    assert windows["ht_nf_pre_nat"] == windows["ht_nf_out_nat"] == (PRI_NAT_DST + 1, PRI_FILTER - 1)
    assert windows["ht_nf_forward"] == (PRI_FILTER + 1, PRI_NAT_SRC - 1)
    for name in ("ht_nf_post_nat", "ht_nf_in_nat"):
        lo, hi = windows[name]
        assert lo == PRI_NAT_SRC + 1 and hi < 300, "after SNAT, well before helpers and confirm"


def test_an_error_other_than_ebusy_stays_fatal() -> None:
    p, obj = TracepointProvider(), FakeNfObject(set(), fail=(0, -199))
    with pytest.raises(HairtraceError, match="Invalid argument") as exc:
        p.attach(obj, "/run/netns/node")  # type: ignore[arg-type]
    assert not isinstance(exc.value, NetfilterBusy)
    assert [t for t in obj.tried if t[0] == "ht_nf_pre_ct"] == [("ht_nf_pre_ct", 0, -199)]


def test_a_full_window_names_the_holders(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        {
            812: ("hairtrace", {28: NF_FDINFO.format(hook=0, prio=-199)}),
            901: ("hairtrace", {28: NF_FDINFO.format(hook=0, prio=-150)}),
            950: ("bpftool", {7: NF_FDINFO.format(hook=4, prio=101)}),  # another hook
        },
    )
    full = {(0, prio) for prio in range(-199, -100)}
    p, obj = TracepointProvider(proc=proc), FakeNfObject(full)
    with pytest.raises(HairtraceError) as exc:
        p.attach(obj, "/run/netns/node")  # type: ignore[arg-type]
    msg = str(exc.value)
    assert "\n" not in msg and not isinstance(exc.value, NetfilterBusy)
    assert "another hairtrace (or another BPF netfilter program)" in msg
    assert "PREROUTING priority -199 in /run/netns/node" in msg and "-199..-101" in msg
    assert "pid 812 (hairtrace), pid 901 (hairtrace)" in msg and "950" not in msg
    assert len([t for t in obj.tried if t[0] == "ht_nf_pre_ct"]) == 99


def test_a_full_window_without_a_holder_says_so(tmp_path: Path) -> None:
    p = TracepointProvider(proc=tmp_path)
    obj = FakeNfObject({(2, prio) for prio in range(1, 100)})
    with pytest.raises(
        HairtraceError, match="no process holds a BPF netfilter link at FORWARD 1..99"
    ):
        p.attach(obj, "/run/netns/node")  # type: ignore[arg-type]


def test_netfilter_programs_name_the_points_and_priorities_the_bpf_source_gives() -> None:
    """NfProgram.point/priority mirror HT_NF_PROG(name, point, prio) in hairtrace.bpf.c."""
    import re
    from pathlib import Path

    from tracer.events.model import Point
    from tracer.kernel.providers import TracepointProvider

    src = (Path(__file__).resolve().parents[2] / "bpf" / "hairtrace.bpf.c").read_text()
    progs = {
        m[0]: (m[1], int(m[2]))
        for m in re.findall(r"^HT_NF_PROG\((\w+), HT_PT_(\w+), (-?\d+)\)", src, re.MULTILINE)
    }
    assert progs and set(progs) == {h.name for h in TracepointProvider.HOOKS}
    for h in TracepointProvider.HOOKS:
        point, prio = progs[h.name]
        assert (h.point, h.priority) == (Point[point], prio), h


def test_moved_names_only_the_programs_off_their_compiled_priority() -> None:
    from tracer.kernel.providers import TracepointProvider

    p = TracepointProvider()
    p.priorities = {h.name: h.priority for h in p.HOOKS}
    assert p.moved() == {}
    p.priorities["ht_nf_pre_ct"] = -198
    assert p.moved() == {5: -198}


def test_events_of_a_moved_program_carry_its_real_priority() -> None:
    import numpy as np

    from tracer.events.codec import EVENT_DTYPE
    from tracer.trace import set_nf_prio

    batch = np.zeros((3, 128), dtype=np.uint8)
    rec = batch.view(EVENT_DTYPE).ravel()
    rec["point"] = [5, 6, 5]
    rec["nf_prio"] = [-199, -99, -199]
    set_nf_prio(batch, {5: -198})
    rec = batch.view(EVENT_DTYPE).ravel()
    assert rec["nf_prio"].tolist() == [-198, -99, -198]
    assert rec["point"].tolist() == [5, 6, 5]
