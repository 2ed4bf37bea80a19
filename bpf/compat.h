/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * compat.h - the one layer between hairtrace's BPF logic and the toolchain.
 *
 * The logic in hairtrace.bpf.c reads kernel memory only through these macros,
 * so a bcc build (kernel headers, bcc's rewriter) needs a second definition of
 * this file, not a second copy of the logic.
 */
#ifndef HAIRTRACE_COMPAT_H
#define HAIRTRACE_COMPAT_H

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

#define HT_ETH_P_IP 0x0800
#define HT_NFCT_PTRMASK (~7UL)
#define HT_IP_CT_UNTRACKED 7
#define HT_NF_ACCEPT 1

#endif /* HAIRTRACE_COMPAT_H */
