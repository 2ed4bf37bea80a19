"""The holder scan of BPF netfilter links, on a fake /proc (no kernel needed)."""

from __future__ import annotations

from pathlib import Path

from tracer.kernel.nfholders import describe, holders, nf_links, parse_fdinfo

# a netfilter link's fdinfo as Linux 6.18 prints it (bpf_nf_link_show_info)
NF_FDINFO = (
    "pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t1038\n"
    "link_type:\tnetfilter\nlink_id:\t526\nprog_tag:\tf887243b53b44f9b\nprog_id:\t805\n"
    "pf:\t2\thooknum:\t{hook}\tprio:\t{prio}\n"
)
TP_FDINFO = (
    "pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t1038\nlink_type:\traw_tracepoint\n"
    "link_id:\t522\nprog_tag:\t5e2289552fac1d41\nprog_id:\t800\ntp_name:\tnetif_receive_skb\n"
)
SOCKET_FDINFO = "pos:\t0\nflags:\t02\nmnt_id:\t9\nino:\t4242\n"


def fake_proc(root: Path, procs: dict[int, tuple[str, dict[int, str]]]) -> Path:
    for pid, (comm, fds) in procs.items():
        (root / str(pid) / "fdinfo").mkdir(parents=True)
        (root / str(pid) / "comm").write_text(comm + "\n")
        for fd, text in fds.items():
            (root / str(pid) / "fdinfo" / str(fd)).write_text(text)
    (root / "self").mkdir()  # not a pid: ignored
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    return root


def test_parse_fdinfo_reads_netfilter_links_only() -> None:
    assert parse_fdinfo(NF_FDINFO.format(hook=0, prio=-199)) == (2, 0, -199)
    assert parse_fdinfo(NF_FDINFO.format(hook=4, prio=101)) == (2, 4, 101)
    assert parse_fdinfo(TP_FDINFO) is None
    assert parse_fdinfo(SOCKET_FDINFO) is None
    assert parse_fdinfo("link_type:\tnetfilter\nlink_id:\t1\n") is None  # truncated


def test_holders_are_the_pids_with_a_link_in_the_window(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        {
            812: (
                "hairtrace",
                {
                    3: SOCKET_FDINFO,
                    22: TP_FDINFO,
                    28: NF_FDINFO.format(hook=0, prio=-199),
                    29: NF_FDINFO.format(hook=0, prio=-99),
                    30: NF_FDINFO.format(hook=3, prio=-199),
                },
            ),
            901: ("hairtrace", {28: NF_FDINFO.format(hook=0, prio=-198)}),
            950: ("sshd", {3: SOCKET_FDINFO}),
            1000: ("other", {5: NF_FDINFO.format(hook=0, prio=-250)}),  # outside the window
        },
    )
    assert len(nf_links(proc)) == 5
    found = holders(0, -199, -101, proc=proc)
    assert [(h.pid, h.priority) for h in found] == [(812, -199), (901, -198)]
    assert describe(found) == "pid 812 (hairtrace), pid 901 (hairtrace)"
    assert [h.pid for h in holders(3, -199, -101, proc=proc)] == [812]
    assert holders(4, 101, 199, proc=proc) == []
    assert holders(0, -199, -101, pf=10, proc=proc) == []  # IPv6 links are another table


def test_a_vanished_or_unreadable_process_is_skipped(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {812: ("hairtrace", {28: NF_FDINFO.format(hook=0, prio=-199)})})
    (proc / "77").mkdir()  # a process that exited between listing and reading: no fdinfo
    (proc / "812" / "fdinfo" / "31").mkdir()  # unreadable as a file
    assert [h.pid for h in holders(0, -199, -101, proc=proc)] == [812]
    assert nf_links(tmp_path / "nowhere") == []
