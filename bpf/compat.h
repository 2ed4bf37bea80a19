/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * compat.h - the one layer between hairtrace's BPF logic and the toolchain.
 *
 * The logic in hairtrace.bpf.c reads kernel memory, touches maps, emits
 * events and declares kprobe / tracepoint entry points only through these
 * macros. Two builds of the same source:
 *
 *   libbpf CO-RE (default): vmlinux.h, BTF relocations, ring buffer, rodata config.
 *   bcc (-DHT_BCC): compiled at start-up by bcc against the running kernel's
 *     headers; config as -D macros (HT_CFG_*); ring buffer, or perf buffer
 *     with -DHT_PERF_OUTPUT (kernels before 5.8); kprobes and raw tracepoints.
 */
#ifndef HAIRTRACE_COMPAT_H
#define HAIRTRACE_COMPAT_H

#ifndef HT_BCC
/* ================================================================ CO-RE */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>

/* Read a (possibly nested) field of a kernel pointer, CO-RE relocated. */
#define HT_READ(src, ...) BPF_CORE_READ(src, __VA_ARGS__)
/* Load a field straight from a BTF-typed pointer when btf is true (tp_btf,
 * fentry and netfilter arguments, and pointers loaded from them): a plain
 * load the verifier guards, instead of a helper call per field. With btf
 * false (kprobe arguments are plain addresses) it is HT_READ. btf is always a
 * compile-time constant at the call site, so only one branch is emitted. */
#define HT_LOAD(btf, src, field) ((btf) ? (src)->field : HT_READ(src, field))
/* Copy a char array field (device name, always NUL-terminated in the kernel)
 * into a local buffer of the same size: one plain copy, no byte-wise scan. */
#define HT_READ_STR(dst, src, ...) BPF_CORE_READ_INTO(dst, src, __VA_ARGS__)
/* Copy raw kernel bytes (packet headers). */
#define HT_COPY(dst, size, ptr) bpf_probe_read_kernel(dst, size, ptr)
/* Does this kernel have that field? (conntrack may be compiled out). */
#define HT_HAS_FIELD(...) bpf_core_field_exists(__VA_ARGS__)
#ifdef HT_DIRECT
/* Direct reads of packet headers and conntrack tuples (Linux 6.2+): a kernel
 * address cast to a read-only BTF pointer of its type. Loads through it are
 * plain loads the kernel guards (a fault reads 0), and the verifier turns the
 * cast itself into a register move, so the filter needs no helper call.
 * bpf/build/hairtrace.bpf.o; hairtrace-copy.bpf.o (older kernels) copies. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
#define HT_CAST(type, addr) \
	((const type *)bpf_rdonly_cast((const void *)(addr), bpf_core_type_id_kernel(type)))
#define HT_DIRECT_READS 1
#endif

/* Maps and counters (declared in hairtrace.bpf.c). */
#define HT_LOOKUP(map, key) bpf_map_lookup_elem(&map, key)
#define HT_UPDATE(map, key, val) bpf_map_update_elem(&map, key, val, BPF_ANY)
#define HT_INSERT(map, key, val) bpf_map_update_elem(&map, key, val, BPF_NOEXIST)
#define HT_DELETE(map, key) bpf_map_delete_elem(&map, key)
#define HT_COUNT(arr, i) arr##_count(i) /* per-CPU counters (hairtrace.bpf.c) */
/* Event output: ctx is for the perf buffer, which the CO-RE build never uses. */
#define HT_RB_AVAIL(map) bpf_ringbuf_query(&map, BPF_RB_AVAIL_DATA)
#define HT_OUTPUT(ctx, map, ev, size, flags) bpf_ringbuf_output(&map, ev, size, flags)

/* Entry points: a kprobe on fn, a tracepoint with typed arguments (BTF). */
#define HT_KPROBE(name, fn, args...) SEC("kprobe/" #fn) int BPF_KPROBE(name, ##args)
#define HT_TP(name, tp, args...) SEC("tp_btf/" #tp) int BPF_PROG(name, ##args)
/* HT_TP arguments are BTF-typed here (tp_btf): HT_LOAD may load directly. */
#define HT_TP_BTF true

#else
/* ================================================================== bcc */
#include <linux/types.h>
#include <linux/skbuff.h>
#include <linux/netdevice.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/netfilter.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack.h>

/* net/bridge/br_private.h is not in the headers package; br_forward reads
 * only the egress device, the second member since the struct exists. */
struct net_bridge_port {
	void *br;
	struct net_device *dev;
};

/* Explicit probe reads: bcc's rewriter only follows pointers it can trace
 * back to a probe argument, and these helpers take pointers out of structs
 * and maps too. The rewriter leaves `&p->field` alone. */
#define HT_R1(s, a) \
	({ typeof((s)->a) __r; bpf_probe_read_kernel((void *)&__r, sizeof(__r), &(s)->a); __r; })
#define HT_R2(s, a, b) HT_R1(HT_R1(s, a), b)
#define HT_R3(s, a, b, c) HT_R1(HT_R2(s, a, b), c)
#define HT_RN(_1, _2, _3, n, ...) n
#define HT_READ(src, ...) HT_RN(__VA_ARGS__, HT_R3, HT_R2, HT_R1, 0)(src, __VA_ARGS__)
#define HT_READ_STR(dst, src, a) bpf_probe_read_kernel(dst, sizeof(*(dst)), &(src)->a)
/* No BTF-typed pointers in bcc programs: every load is a probe read. */
#define HT_LOAD(btf, src, field) HT_READ(src, field)
#define HT_TP_BTF false
#define HT_COPY(dst, size, ptr) bpf_probe_read_kernel(dst, size, ptr)
/* The headers of the running kernel decide at compile time. */
#define HT_HAS_FIELD(...) 1

/* Maps are bcc tables, used through small functions in hairtrace.bpf.c
 * (bcc refuses map method calls inside macros); config comes as -D macros. */
#define HT_LOOKUP(map, key) map##_lookup(key)
#define HT_UPDATE(map, key, val) map##_update(key, val)
#define HT_INSERT(map, key, val) map##_insert(key, val)
#define HT_DELETE(map, key) map##_delete(key)
#define HT_COUNT(arr, i) arr##_count(i)
#define HT_OUTPUT(ctx, map, ev, size, flags) map##_output(ctx, ev, flags)
#define ht_cfg ((const struct ht_config){ .svc_addr = HT_CFG_SVC_ADDR, \
	.svc_port = HT_CFG_SVC_PORT, .protos = HT_CFG_PROTOS, .data_budget = HT_CFG_DATA_BUDGET, \
	.svc_mask = HT_CFG_SVC_MASK, .svc_set = HT_CFG_SVC_SET })
#ifndef HT_RINGBUF_PAGES /* the loader may size the ring buffer */
#define HT_RINGBUF_PAGES (HT_RINGBUF_BYTES / 4096)
#endif
/* bcc 0.26 has no ring-buffer query method: never force a wake-up; the
 * reader's poll timeout bounds the delay. */
#define HT_RB_AVAIL(map) 0

/* Entry points in libbpf's style (typed arguments, body after the macro) but
 * read from pt_regs / raw tracepoint args by hand: bcc's own argument
 * rewriting cannot edit a parameter list that comes from a macro. */
#define HT_A0(get)
#define HT_A1(get, a) (void *)get(0)
#define HT_A2(get, a, b) HT_A1(get, a), (void *)get(1)
#define HT_A3(get, a, b, c) HT_A2(get, a, b), (void *)get(2)
#define HT_A4(get, a, b, c, d) HT_A3(get, a, b, c), (void *)get(3)
#define HT_AN(_0, _1, _2, _3, _4, n, ...) n
#define HT_ARGS(get, args...) HT_AN(0, ##args, HT_A4, HT_A3, HT_A2, HT_A1, HT_A0)(get, ##args)
#define HT_KP_ARG(i) HT_KP_ARG_##i(ctx)
#define HT_KP_ARG_0(c) PT_REGS_PARM1(c)
#define HT_KP_ARG_1(c) PT_REGS_PARM2(c)
#define HT_KP_ARG_2(c) PT_REGS_PARM3(c)
#define HT_KP_ARG_3(c) PT_REGS_PARM4(c)
#define HT_TP_ARG(i) ctx->args[i]
#define HT_ENTRY(name, ctx_type, get, args...)                                        \
	static __always_inline int ____##name(ctx_type *ctx, ##args);                 \
	int name(ctx_type *ctx) { return ____##name(ctx, HT_ARGS(get, ##args)); }     \
	static __always_inline int ____##name(ctx_type *ctx, ##args)
#define HT_KPROBE(name, fn, args...) HT_ENTRY(name, struct pt_regs, HT_KP_ARG, ##args)
#define HT_TP(name, tp, args...) HT_ENTRY(name, struct bpf_raw_tracepoint_args, HT_TP_ARG, ##args)

#endif /* HT_BCC */

#ifndef HT_DIRECT_READS
#define HT_DIRECT_READS 0 /* bcc, hairtrace-copy.bpf.o: headers copied by a helper */
#endif
/* bpf/build/floor.bpf.o (scripts/bench's dispatch floor): every entry point
 * returns at once, attached where the real ones are. */
#ifndef HT_FLOOR
#define HT_FLOOR 0
#endif

#define HT_ETH_P_IP 0x0800
#define HT_NFCT_PTRMASK (~7UL)
#define HT_IP_CT_UNTRACKED 7
#define HT_NF_ACCEPT 1

#endif /* HAIRTRACE_COMPAT_H */
