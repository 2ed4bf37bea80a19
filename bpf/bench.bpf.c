// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * bench.bpf.c - a synthetic event producer for scripts/bench.
 *
 * Same shape as hairtrace.bpf.c's output path: a 128-byte struct ht_event
 * (hairtrace.h) reserved in a ring buffer of the same size, filled, and
 * submitted with the same wake-up batching as emit_event. It fires on
 * tp_btf/sys_enter, only for getppid(2) of one process (the bench's producer),
 * and emits hb_cfg.per_call events per call, so user space sets the event rate
 * by how often it calls getppid().
 *
 * Layout: maps, config, counters; helpers; entry point; licence.
 */
#include "compat.h"
#include "hairtrace.h"

#define HB_MAX_PER_CALL 256 /* bound of the per-call loop (verifier) */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, HT_RINGBUF_BYTES);
} events SEC(".maps");

/* Set once by the loader between open and load (rodata). */
struct hb_config {
	__u32 tgid;       /* the producer process */
	__u32 per_call;   /* events per getppid(), <= HB_MAX_PER_CALL */
	__s64 syscall_nr; /* __NR_getppid of this architecture */
};

const volatile struct hb_config hb_cfg = {};

/* Read by user space through .bss; never reset by BPF. */
__u64 hb_emitted = 0;
__u64 hb_lost = 0;

/* -------------------------------------------------------------- helpers */

/* hairtrace's emit_event, with reserve/submit: wake the reader only when
 * enough data waits; it also polls on a short timeout. */
static __always_inline void emit_event(__u64 seq, __u32 tgid)
{
	__u64 flags = BPF_RB_NO_WAKEUP;
	struct ht_event *ev;

	/* the same wake-up rule as hairtrace.bpf.c's emit_event */
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);

	if (avail / HT_WAKEUP_BYTES != (avail + sizeof(struct ht_event) + 8) / HT_WAKEUP_BYTES)
		flags = BPF_RB_FORCE_WAKEUP;
	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev) {
		__sync_fetch_and_add(&hb_lost, 1);
		return;
	}
	/* Reserved memory is not zeroed: write every byte, as a real event does. */
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->skb = seq;
	ev->point = HT_PT_DEV_RX;
	ev->hook = 0xff;
	ev->netns = tgid;
	ev->proto = 6; /* IPPROTO_TCP */
	ev->pkt.saddr = 0x0100007f;
	ev->pkt.daddr = 0x0100007f;
	ev->pkt.sport = (__u16)seq;
	ev->pkt.dport = 0x5000; /* port 80, network order */
	__builtin_memcpy(ev->dev, "hb-bench", 9);
	bpf_ringbuf_submit(ev, flags);
	__sync_fetch_and_add(&hb_emitted, 1);
}

/* ---------------------------------------------------------- entry point */

SEC("tp_btf/sys_enter")
int BPF_PROG(hb_sys_enter, struct pt_regs *regs, long id)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 base;
	__u32 i;

	if (id != hb_cfg.syscall_nr || tgid != hb_cfg.tgid)
		return 0;
	base = hb_emitted;
	/* Bounded by a constant for the verifier; per_call is rodata, so the
	 * verifier knows the real trip count. */
	for (i = 0; i < HB_MAX_PER_CALL; i++) {
		if (i >= hb_cfg.per_call)
			break;
		emit_event(base + i, tgid);
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
