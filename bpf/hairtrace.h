/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * hairtrace.h - the one contract between the BPF programs and user space.
 *
 * Every provider (tracepoint, fentry, kprobe) emits the same record. Python
 * mirrors it in tracer/events/codec.py and a test checks that mirror against
 * the BTF of the compiled object. Fixed-width types, explicit padding,
 * addresses and ports in network byte order.
 */
#ifndef HAIRTRACE_H
#define HAIRTRACE_H

#define HT_DEV_LEN 16
#define HT_MAX_FLOWS 16384 /* learned tuples (4 keys per conntrack entry) */
#define HT_MAX_BUDGETS 65536 /* data-packet budgets: per tuple, point and device */
/* Slots of the pre-filter in front of the learned tuples: a byte per slot, set
 * when a tuple is learned, never cleared (a stale slot costs one map lookup). */
#define HT_SEEN_BITS 20
#define HT_MAX_SERVICES 65536 /* Service addresses of a range (--svc CIDR) */
#define HT_RINGBUF_BYTES (4 * 1024 * 1024)
#define HT_WAKEUP_BYTES (64 * 1024) /* wake the reader only past this much data */

/* Where an event was taken. Numbers are stable: sessions store them. */
enum ht_point {
	HT_PT_NONE = 0,
	/* device and stack tracepoints (all providers) */
	HT_PT_DEV_RX = 1,     /* tp_btf/netif_receive_skb */
	HT_PT_DEV_TX = 2,     /* tp_btf/net_dev_start_xmit */
	HT_PT_DROP = 3,       /* tp_btf/kfree_skb: reason + location */
	HT_PT_TCP_RESET = 4,  /* tp_btf/tcp_send_reset: tuple of the packet answered */
	/* BPF netfilter-hook programs (tracepoint provider), IPv4 */
	HT_PT_NF_PRE_CT = 5,   /* PREROUTING after conntrack (-200), before DNAT */
	HT_PT_NF_PRE_NAT = 6,  /* PREROUTING after DNAT (-100) */
	HT_PT_NF_OUT_CT = 7,   /* LOCAL_OUT after conntrack */
	HT_PT_NF_OUT_NAT = 8,  /* LOCAL_OUT after DNAT */
	HT_PT_NF_FORWARD = 9,  /* FORWARD after the filter table */
	HT_PT_NF_POST_NAT = 10, /* POSTROUTING after SNAT (100) */
	HT_PT_NF_IN_NAT = 11,  /* LOCAL_IN after SNAT */
	/* function probes (fentry / kprobe providers) */
	HT_PT_BR_HANDLE_FRAME = 16,
	HT_PT_BR_FORWARD = 17,
	HT_PT_BR_PASS_UP = 18,
	HT_PT_BR_NF_PRE_ROUTING = 19,
	HT_PT_CT_IN = 20,
	HT_PT_CT_CONFIRM = 21,
	HT_PT_NAT_MANIP = 22,
	HT_PT_NAT_SETUP = 23,
	HT_PT_TCP_V4_SEND_RESET = 24,
	HT_PT_BR_DEV_XMIT = 25,
	HT_PT_MAX = 32,
};

/* ht_event.ct_flags */
#define HT_CT_PRESENT 0x01 /* skb carried a conntrack entry */
#define HT_CT_UNTRACKED 0x02

/* ht_event.aux at HT_PT_NAT_MANIP: manip type | direction << 8 | HT_AUX_VALID */
#define HT_AUX_VALID 0x10000
/* ht_event.aux at HT_PT_CT_IN (fexit only): verdict | HT_AUX_VALID */

/* ht_config.protos */
#define HT_PROTO_TCP 0x01
#define HT_PROTO_UDP 0x02

/* A TCP/UDP 4-tuple, network byte order. */
struct ht_tuple {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/* One observation of one packet at one point. 128 bytes. */
struct ht_event {
	__u64 ts_ns;    /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 skb;      /* skb address: identity hint within one hop chain */
	__u64 ct_id;    /* conntrack entry address, 0 when none */
	__u64 location; /* kfree_skb: address of the freeing function */
	__u32 netns;    /* network namespace inode */
	__u32 ifindex;
	__u16 point;    /* enum ht_point */
	__u8 hook;      /* netfilter hook number, 0xff when not a hook */
	__u8 tcp_flags;
	__s32 nf_prio;  /* priority of the netfilter program */
	/* the packet's addresses at this point; of an ICMP error (proto
	 * IPPROTO_ICMP): the tuple of the packet it quotes (its inner header) */
	struct ht_tuple pkt;
	__u32 seq;      /* TCP: sequence number; UDP: datagram length; ICMP error: its own source address (host order) */
	__u32 ack_seq;  /* TCP: ack number; ICMP error: its own destination address (host order) */
	__u16 ip_id;
	__u8 ct_flags;  /* HT_CT_* */
	__u8 ctinfo;    /* enum ip_conntrack_info */
	__u32 ct_status; /* enum ip_conntrack_status bits */
	__u32 reason;   /* drop reason / reset reason */
	struct ht_tuple ct_orig;  /* conntrack original-direction tuple */
	struct ht_tuple ct_reply; /* conntrack reply-direction tuple */
	__u32 aux;      /* point-specific: NAT manip (HT_AUX_*), conntrack verdict */
	__u8 proto;     /* IPPROTO_TCP, IPPROTO_UDP, or IPPROTO_ICMP for an ICMP error */
	__u8 inner_proto; /* ICMP error: the quoted packet's protocol (TCP or UDP); else 0 */
	__u8 icmp_type; /* ICMP error: type and code (3/3 port unreachable, 3/4 fragmentation needed, ...) */
	__u8 icmp_code;
	char dev[HT_DEV_LEN];
};

/* Set once by the loader between open and load (rodata). */
struct ht_config {
	__u32 svc_addr; /* network byte order: an address, or a range's first (--svc CIDR) */
	__u16 svc_port; /* network byte order, 0 = any port */
	__u8 protos;    /* HT_PROTO_TCP | HT_PROTO_UDP: which the service is traced for */
	/* TCP packets without SYN, FIN or RST, and UDP datagrams, emitted per
	 * tuple, point and device (the handshake's ACK and the first data; a UDP
	 * flow's first requests and replies); 0 = every packet. Resets, ICMP errors
	 * and drops of TCP segments are always emitted (drops of datagrams count);
	 * a SYN or SYN+ACK starts the count again. */
	__u8 data_budget;
	__u32 svc_mask; /* network byte order: 255.255.255.255 for one address, else the range's */
	/* A range's Service addresses are those in the services map (filled by the
	 * loader from kube-proxy's rules), not every address in it: 0 = every address. */
	__u8 svc_set;
	__u8 _pad[3];
};

#endif /* HAIRTRACE_H */
