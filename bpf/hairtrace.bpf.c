// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * hairtrace.bpf.c - per-packet events for the connections of one Service.
 *
 * Layout: maps, then helpers over kernel pointers (peek_packet, ours,
 * read_packet, read_ct, learn_ct, emit_event), then thin entry points per
 * provider. Only packets of the service VIP:port or of tuples learned from its
 * conntrack entries cost an event. Everything else is turned away by ours()
 * before the event exists: a few loads of its headers (direct loads where the
 * kernel allows, else one copy), the protocol, the service address and port
 * from rodata, the pre-filter's byte, and only then the learned tuples' hash.
 */
#include "compat.h"
#include "hairtrace.h"

struct ht_flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 _pad[3];
};

/* One byte per slot of the learned tuples' pre-filter (HT_SEEN_BITS). */
struct ht_seen {
	__u8 slot[1 << HT_SEEN_BITS];
};

/* Non-control TCP packets seen per tuple, point and device (ht_cfg.data_budget). */
struct ht_budget_key {
	struct ht_flow_key flow;
	__u32 ifindex;
	__u16 point;
	__u8 _pad[2];
};

#ifndef HT_BCC
char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, HT_RINGBUF_BYTES);
} events SEC(".maps");

/* Tuples learned from the service's conntrack entries, both directions,
 * before and after NAT. Value: conntrack entry address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, HT_MAX_FLOWS);
	__type(key, struct ht_flow_key);
	__type(value, __u64);
} flows SEC(".maps");

/* Non-control TCP packets seen per tuple, point and device (ht_cfg.data_budget). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, HT_MAX_BUDGETS);
	__type(key, struct ht_budget_key);
	__type(value, __u32);
} budgets SEC(".maps");

/* Counters per probe point, one copy per CPU: a counter every CPU increments (one per
 * packet past its budget, at every hop) made the CPUs take its cache line from each
 * other on every packet. User space sums the copies (trace.py _Losses). */
struct ht_counters {
	__u64 emitted[HT_PT_MAX];
	__u64 lost[HT_PT_MAX];
	__u64 over_budget[HT_PT_MAX]; /* matched, not emitted: past the data budget */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ht_counters);
} counters SEC(".maps");

/* The pre-filter of flows: one array element, its lookup inlined by the verifier. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ht_seen);
} seen SEC(".maps");

/* The Service addresses of a range (ht_cfg.svc_set), network byte order. Not
 * preallocated: a trace of one address keeps it empty. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, HT_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u8);
} services SEC(".maps");

const volatile struct ht_config ht_cfg = {};

/* Keep the contract's types in the object's BTF for the layout test. */
const struct ht_event *unused_ht_event __attribute__((unused));
const enum ht_point *unused_ht_point __attribute__((unused));

/* compat.h's HT_COUNT(arr, i): this CPU's copy (never reset by BPF). Atomic all the
 * same: a program may interrupt another on its CPU (a softirq's packet). */
#define HT_PERCPU_COUNT(field, i)                                            \
	do {                                                                 \
		__u32 zero = 0;                                              \
		struct ht_counters *c = bpf_map_lookup_elem(&counters, &zero); \
		if (c)                                                       \
			__sync_fetch_and_add(&c->field[(i) & (HT_PT_MAX - 1)], 1); \
	} while (0)

static __always_inline void ht_emitted_count(__u32 i)
{
	HT_PERCPU_COUNT(emitted, i);
}

static __always_inline void ht_lost_count(__u32 i)
{
	HT_PERCPU_COUNT(lost, i);
}

static __always_inline void ht_over_budget_count(__u32 i)
{
	HT_PERCPU_COUNT(over_budget, i);
}
#else
/* The same maps as bcc tables; the counters are array maps user space reads. */
#ifdef HT_PERF_OUTPUT
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, HT_RINGBUF_PAGES);
#endif
BPF_TABLE("lru_hash", struct ht_flow_key, __u64, flows, HT_MAX_FLOWS);
BPF_ARRAY(ht_emitted, __u64, HT_PT_MAX);
BPF_ARRAY(ht_lost, __u64, HT_PT_MAX);
BPF_TABLE("lru_hash", struct ht_budget_key, __u32, budgets, HT_MAX_BUDGETS);
BPF_ARRAY(ht_over_budget, __u64, HT_PT_MAX);
BPF_ARRAY(seen, struct ht_seen, 1);
BPF_HASH(services, __u32, __u8, HT_MAX_SERVICES);

/* bcc rewrites map method calls only outside macros: compat.h's HT_LOOKUP,
 * HT_UPDATE, HT_INSERT, HT_DELETE, HT_COUNT and HT_OUTPUT call these. */
static __always_inline void *flows_lookup(struct ht_flow_key *key)
{
	return flows.lookup(key);
}

static __always_inline void flows_update(struct ht_flow_key *key, __u64 *val)
{
	flows.update(key, val);
}

static __always_inline void *budgets_lookup(struct ht_budget_key *key)
{
	return budgets.lookup(key);
}

static __always_inline void budgets_insert(struct ht_budget_key *key, __u32 *val)
{
	budgets.insert(key, val);
}

static __always_inline void budgets_delete(struct ht_budget_key *key)
{
	budgets.delete(key);
}

static __always_inline void *seen_lookup(__u32 *key)
{
	return seen.lookup(key);
}

static __always_inline void *services_lookup(__u32 *key)
{
	return services.lookup(key);
}

static __always_inline void ht_over_budget_count(__u32 i)
{
	ht_over_budget.atomic_increment(i);
}

static __always_inline void ht_emitted_count(__u32 i)
{
	ht_emitted.atomic_increment(i);
}

static __always_inline void ht_lost_count(__u32 i)
{
	ht_lost.atomic_increment(i);
}

static __always_inline int events_output(void *ctx, struct ht_event *ev, __u64 flags)
{
#ifdef HT_PERF_OUTPUT
	return events.perf_submit(ctx, ev, sizeof(*ev));
#else
	return events.ringbuf_output(ev, sizeof(*ev), flags);
#endif
}
#endif /* HT_BCC */

/* -------------------------------------------------------------- helpers */

static __always_inline bool traced_proto(__u8 proto)
{
	return (proto == IPPROTO_TCP && (ht_cfg.protos & HT_PROTO_TCP)) ||
	       (proto == IPPROTO_UDP && (ht_cfg.protos & HT_PROTO_UDP));
}

/* The protocol of the flow a packet belongs to: an ICMP error's is the quoted packet's. */
static __always_inline __u8 flow_proto(const struct ht_event *ev)
{
	return ev->proto == IPPROTO_ICMP ? ev->inner_proto : ev->proto;
}

#define HT_ICMP_DEST_UNREACH 3
#define HT_ICMP_TIME_EXCEEDED 11
#define HT_ICMP_PARAMETERPROB 12

/* An ICMP error (destination unreachable, time exceeded, parameter problem): the
 * event takes the tuple of the packet it quotes, so it matches that packet's flow.
 * Only ICMP packets pay this second read; other packets never get here. */
static __always_inline int read_icmp_error(const unsigned char *l4, const struct iphdr *outer,
					   const void *icmp, struct ht_event *ev)
{
	/* ICMP header (8 bytes), then the quoted IP header and its first 8 bytes */
	struct {
		struct iphdr iph;
		__be16 sport;
		__be16 dport;
	} in;
	const __u8 *ih = icmp;
	__u8 type = ih[0];

	if (type != HT_ICMP_DEST_UNREACH && type != HT_ICMP_TIME_EXCEEDED &&
	    type != HT_ICMP_PARAMETERPROB)
		return -1;
	if (HT_COPY(&in, sizeof(in), l4 + 8))
		return -1;
	if (in.iph.version != 4 || !traced_proto(in.iph.protocol) ||
	    (in.iph.frag_off & bpf_htons(0x1fff)))
		return -1;
	if (in.iph.ihl != 5 && HT_COPY(&in.sport, 4, l4 + 8 + in.iph.ihl * 4))
		return -1;
	ev->proto = IPPROTO_ICMP;
	ev->inner_proto = in.iph.protocol;
	ev->icmp_type = type;
	ev->icmp_code = ih[1];
	ev->pkt.saddr = in.iph.saddr;
	ev->pkt.daddr = in.iph.daddr;
	ev->pkt.sport = in.sport;
	ev->pkt.dport = in.dport;
	ev->seq = bpf_ntohl(outer->saddr);
	ev->ack_seq = bpf_ntohl(outer->daddr);
	ev->ip_id = bpf_ntohs(outer->id);
	return 0;
}

/* The headers into ev with helper copies: kernels without bpf_rdonly_cast, and ICMP errors. */
static __always_inline int copy_packet(const struct sk_buff *skb, struct ht_event *ev, bool btf)
{
	unsigned char *head = HT_LOAD(btf, skb, head);
	__u16 nh = HT_LOAD(btf, skb, network_header);
	/* One copy for the IP header and, without IP options, the transport
	 * header behind it: every packet on a traced path pays this read. */
	struct {
		struct iphdr iph;
		union {
			struct tcphdr th;
			struct udphdr uh;
		} l4;
	} h;
	bool whole;

	if (!head || nh == (__u16)~0U)
		return -1;
	whole = !HT_COPY(&h, sizeof(h), head + nh);
	if (!whole && HT_COPY(&h.iph, sizeof(h.iph), head + nh))
		return -1;
	if (h.iph.version != 4)
		return -1;
	if (!traced_proto(h.iph.protocol) && h.iph.protocol != IPPROTO_ICMP)
		return -1;
	/* Only first fragments carry ports. */
	if (h.iph.frag_off & bpf_htons(0x1fff))
		return -1;
	if ((!whole || h.iph.ihl != 5) && HT_COPY(&h.l4, sizeof(h.l4), head + nh + h.iph.ihl * 4))
		return -1;
	if (h.iph.protocol == IPPROTO_ICMP)
		return read_icmp_error(head + nh + h.iph.ihl * 4, &h.iph, &h.l4, ev);
	ev->proto = h.iph.protocol;
	ev->pkt.saddr = h.iph.saddr;
	ev->pkt.daddr = h.iph.daddr;
	ev->ip_id = bpf_ntohs(h.iph.id);
	if (h.iph.protocol == IPPROTO_TCP) {
		ev->pkt.sport = h.l4.th.source;
		ev->pkt.dport = h.l4.th.dest;
		ev->seq = bpf_ntohl(h.l4.th.seq);
		ev->ack_seq = bpf_ntohl(h.l4.th.ack_seq);
		ev->tcp_flags = ((__u8 *)&h.l4.th)[13];
	} else {
		ev->pkt.sport = h.l4.uh.source;
		ev->pkt.dport = h.l4.uh.dest;
		ev->seq = bpf_ntohs(h.l4.uh.len);
	}
	return 0;
}

/* The packet's headers into ev: direct loads where the kernel allows (a packet that is
 * ours pays them at every hop), else copy_packet. */
static __always_inline int read_packet(const struct sk_buff *skb, struct ht_event *ev, bool btf)
{
#if HT_DIRECT_READS
	unsigned char *head = HT_LOAD(btf, skb, head);
	__u16 nh = HT_LOAD(btf, skb, network_header);
	const struct iphdr *iph;
	const unsigned char *l4;
	__u8 vihl, proto;

	if (!head || nh == (__u16)~0U)
		return -1;
	iph = HT_CAST(struct iphdr, head + nh);
	vihl = *(const __u8 *)iph;
	proto = iph->protocol;
	if ((vihl >> 4) != 4 || proto == IPPROTO_ICMP)
		return copy_packet(skb, ev, btf); /* refused there, or an ICMP error's quote */
	if (!traced_proto(proto) || (iph->frag_off & bpf_htons(0x1fff)))
		return -1;
	l4 = head + nh + (vihl & 0xf) * 4;
	ev->proto = proto;
	ev->pkt.saddr = iph->saddr;
	ev->pkt.daddr = iph->daddr;
	ev->ip_id = bpf_ntohs(iph->id);
	if (proto == IPPROTO_TCP) {
		const struct tcphdr *th = HT_CAST(struct tcphdr, l4);

		ev->pkt.sport = th->source;
		ev->pkt.dport = th->dest;
		ev->seq = bpf_ntohl(th->seq);
		ev->ack_seq = bpf_ntohl(th->ack_seq);
		ev->tcp_flags = ((const __u8 *)th)[13];
	} else {
		const struct udphdr *uh = HT_CAST(struct udphdr, l4);

		ev->pkt.sport = uh->source;
		ev->pkt.dport = uh->dest;
		ev->seq = bpf_ntohs(uh->len);
	}
	return 0;
#else
	return copy_packet(skb, ev, btf);
#endif
}

/* The service's address (or one of a range's Services) and port? A packet outside
 * the range is decided by the mask; only one inside it may look up the set. */
static __always_inline bool is_service(__u32 addr, __u16 port)
{
	if ((addr & ht_cfg.svc_mask) != ht_cfg.svc_addr)
		return false;
	if (ht_cfg.svc_port && port != ht_cfg.svc_port)
		return false;
	return !ht_cfg.svc_set || HT_LOOKUP(services, &addr) != NULL;
}

/* The pre-filter's slot of a tuple: the same for both directions (learn_tuple
 * learns both), Fibonacci hashing of addresses, ports and protocol. */
static __always_inline __u32 seen_slot(const struct ht_tuple *t, __u8 proto)
{
	__u32 h = (t->saddr ^ t->daddr) ^ ((__u32)(t->sport ^ t->dport) << 8) ^ proto;

	return (h * 0x9E3779B1u) >> (32 - HT_SEEN_BITS);
}

/* Could the tuple have been learned? No for almost every packet that is not
 * ours: one multiply and one load instead of the flows map's hash lookup. */
static __always_inline bool maybe_learned(const struct ht_tuple *t, __u8 proto)
{
	__u32 zero = 0;
	struct ht_seen *s = HT_LOOKUP(seen, &zero);

	return s && s->slot[seen_slot(t, proto)];
}

static __always_inline bool match_flow(const struct ht_tuple *t, __u8 proto)
{
	struct ht_flow_key key = {
		.saddr = t->saddr, .daddr = t->daddr,
		.sport = t->sport, .dport = t->dport, .proto = proto,
	};

	if (is_service(t->daddr, t->dport) || is_service(t->saddr, t->sport))
		return true;
	return maybe_learned(t, proto) && HT_LOOKUP(flows, &key) != NULL;
}

/* One copy of the whole tuple, then fields of the copy (CO-RE relocates
 * those offsets like any other), instead of a helper call per field. */
static __always_inline __u8 read_ct_tuple(const struct nf_conntrack_tuple *t, struct ht_tuple *out)
{
#if HT_DIRECT_READS
	const struct nf_conntrack_tuple *tup = HT_CAST(struct nf_conntrack_tuple, t);

	out->saddr = tup->src.u3.ip;
	out->daddr = tup->dst.u3.ip;
	out->sport = tup->src.u.all;
	out->dport = tup->dst.u.all;
	return tup->dst.protonum;
#else
	struct nf_conntrack_tuple tup;

	HT_COPY(&tup, sizeof(tup), t); /* zero-filled if it fails */
	out->saddr = tup.src.u3.ip;
	out->daddr = tup.dst.u3.ip;
	out->sport = tup.src.u.all;
	out->dport = tup.dst.u.all;
	return tup.dst.protonum;
#endif
}

/* The packet's conntrack entry into ev. service_only: only an entry of the service
 * (a packet no learned tuple matched): its original tuple is read first and decides,
 * so for a packet that is not ours one copy is all this costs. */
static __always_inline struct nf_conn *read_ct(const struct sk_buff *skb, struct ht_event *ev,
					       bool btf, bool service_only)
{
	unsigned long nfct;
	struct nf_conn *ct;

	if (!HT_HAS_FIELD(skb->_nfct))
		return NULL;
	nfct = HT_LOAD(btf, skb, _nfct);
	ct = (struct nf_conn *)(nfct & HT_NFCT_PTRMASK);
	ev->ctinfo = nfct & 7;
	if (!ct) {
		if (ev->ctinfo == HT_IP_CT_UNTRACKED)
			ev->ct_flags |= HT_CT_UNTRACKED;
		return NULL;
	}
	read_ct_tuple(&ct->tuplehash[0].tuple, &ev->ct_orig);
	if (service_only && !is_service(ev->ct_orig.daddr, ev->ct_orig.dport))
		return NULL;
	ev->ct_flags |= HT_CT_PRESENT;
	ev->ct_id = (__u64)ct;
#if HT_DIRECT_READS
	ev->ct_status = HT_CAST(struct nf_conn, ct)->status;
#else
	ev->ct_status = HT_READ(ct, status);
#endif
	read_ct_tuple(&ct->tuplehash[1].tuple, &ev->ct_reply);
	return ct;
}

/* What the filter needs of a packet, read before anything else is done for it. */
struct ht_peek {
	struct ht_tuple t;
	__u8 proto; /* IP protocol: TCP or UDP; ICMP (the full read finds the quoted tuple) */
};

/* The packet's protocol and, for TCP and UDP, its tuple: direct loads of the IP
 * and transport headers where the kernel has bpf_rdonly_cast (HT_DIRECT_READS),
 * else one copy of 24 bytes (a second one only behind IP options). -1 for a
 * packet that cannot be ours (not IPv4, not a traced protocol, a later fragment). */
static __always_inline int peek_packet(const struct sk_buff *skb, struct ht_peek *p, bool btf)
{
	unsigned char *head = HT_LOAD(btf, skb, head);
	__u16 nh = HT_LOAD(btf, skb, network_header);
	__u8 vihl;
	__u16 frag;

	if (!head || nh == (__u16)~0U)
		return -1;
#if HT_DIRECT_READS
	const struct iphdr *iph = HT_CAST(struct iphdr, head + nh);
	const struct udphdr *l4;

	vihl = *(const __u8 *)iph; /* version << 4 | ihl, in any byte order */
	p->proto = iph->protocol;
	if ((vihl >> 4) != 4 || p->proto == IPPROTO_ICMP)
		return (vihl >> 4) == 4 ? 0 : -1;
	if (!traced_proto(p->proto))
		return -1;
	frag = iph->frag_off;
	if (frag & bpf_htons(0x1fff)) /* only first fragments carry ports */
		return -1;
	p->t.saddr = iph->saddr;
	p->t.daddr = iph->daddr;
	l4 = HT_CAST(struct udphdr, head + nh + (vihl & 0xf) * 4);
	p->t.sport = l4->source; /* TCP's ports are where UDP's are */
	p->t.dport = l4->dest;
#else
	struct {
		struct iphdr iph;
		__be16 ports[2];
	} h;

	if (HT_COPY(&h, sizeof(h), head + nh) && HT_COPY(&h.iph, sizeof(h.iph), head + nh))
		return -1;
	vihl = *(const __u8 *)&h.iph;
	p->proto = h.iph.protocol;
	if ((vihl >> 4) != 4 || p->proto == IPPROTO_ICMP)
		return (vihl >> 4) == 4 ? 0 : -1;
	if (!traced_proto(p->proto))
		return -1;
	frag = h.iph.frag_off;
	if (frag & bpf_htons(0x1fff))
		return -1;
	if ((vihl & 0xf) != 5 && HT_COPY(h.ports, sizeof(h.ports), head + nh + (vihl & 0xf) * 4))
		return -1;
	p->t.saddr = h.iph.saddr;
	p->t.daddr = h.iph.daddr;
	p->t.sport = h.ports[0];
	p->t.dport = h.ports[1];
#endif
	return 0;
}

/* Is the packet's conntrack entry one of the service's? Its original tuple's
 * destination decides (a direct load where the kernel allows). */
static __always_inline bool ct_is_service(const struct sk_buff *skb, bool btf)
{
	unsigned long nfct;
	const struct nf_conn *ct;

	if (!HT_HAS_FIELD(skb->_nfct))
		return false;
	nfct = HT_LOAD(btf, skb, _nfct);
	ct = (const struct nf_conn *)(nfct & HT_NFCT_PTRMASK);
	if (!ct)
		return false;
#if HT_DIRECT_READS
	const struct nf_conn *c = HT_CAST(struct nf_conn, ct);

	return is_service(c->tuplehash[0].tuple.dst.u3.ip, c->tuplehash[0].tuple.dst.u.all);
#else
	struct ht_tuple orig;

	read_ct_tuple(&ct->tuplehash[0].tuple, &orig);
	return is_service(orig.daddr, orig.dport);
#endif
}

/* How a packet was found to be ours, decided before its event exists. */
enum ht_match {
	HT_NOT_OURS = 0,
	HT_BY_TUPLE,  /* the service's address or a learned tuple */
	HT_BY_CT,     /* only through its conntrack entry (after DNAT, not yet learned) */
	HT_UNDECIDED, /* an ICMP error: its quoted packet decides, after the full read */
};

/* The filter, in order of cost: the protocol, the service address and port
 * (rodata), the pre-filter's byte, the learned tuples' hash, and at points with
 * ct_fallback the conntrack entry's original destination. */
static __always_inline int ours(const struct sk_buff *skb, bool ct_fallback, bool btf)
{
	struct ht_peek p;

	if (peek_packet(skb, &p, btf))
		return HT_NOT_OURS;
	if (p.proto == IPPROTO_ICMP)
		return HT_UNDECIDED;
	if (match_flow(&p.t, p.proto))
		return HT_BY_TUPLE;
	return ct_fallback && ct_is_service(skb, btf) ? HT_BY_CT : HT_NOT_OURS;
}

static __always_inline void learn_tuple(const struct ht_tuple *t, __u8 proto, __u64 ct_id)
{
	struct ht_flow_key fwd = {
		.saddr = t->saddr, .daddr = t->daddr,
		.sport = t->sport, .dport = t->dport, .proto = proto,
	};
	struct ht_flow_key rev = {
		.saddr = t->daddr, .daddr = t->saddr,
		.sport = t->dport, .dport = t->sport, .proto = proto,
	};
	__u32 zero = 0;
	struct ht_seen *s = HT_LOOKUP(seen, &zero);

	/* the slot before the map: a packet that finds the tuple finds its slot */
	if (s)
		s->slot[seen_slot(t, proto)] = 1;
	HT_UPDATE(flows, &fwd, &ct_id);
	HT_UPDATE(flows, &rev, &ct_id);
}

/* Remember every tuple of a conntrack entry of the service, so replies and
 * resets that never carry the VIP (bridged, reverse NAT skipped) still match.
 * Once per entry and reply tuple: the reply tuple changes when NAT binds, and
 * map updates (LRU hash, locked) cost far more than the lookup that skips them. */
static __always_inline bool learn_ct(const struct ht_event *ev)
{
	struct ht_flow_key reply = {
		.saddr = ev->ct_reply.saddr, .daddr = ev->ct_reply.daddr,
		.sport = ev->ct_reply.sport, .dport = ev->ct_reply.dport, .proto = flow_proto(ev),
	};
	__u64 *known;

	if (!(ev->ct_flags & HT_CT_PRESENT) || !is_service(ev->ct_orig.daddr, ev->ct_orig.dport))
		return false;
	known = HT_LOOKUP(flows, &reply);
	if (known && *known == ev->ct_id)
		return true;
	learn_tuple(&ev->ct_orig, flow_proto(ev), ev->ct_id);
	learn_tuple(&ev->ct_reply, flow_proto(ev), ev->ct_id);
	return true;
}

static __always_inline void read_dev(const struct net_device *dev, struct ht_event *ev, bool btf)
{
	struct net *net;

	if (!dev) {
		/* Locally generated packets may have no device yet (OUTPUT):
		 * their conntrack entry still says which netns they are in. */
		/* (a local: a cast inside HT_READ would relocate ev's own field) */
		struct nf_conn *ct = (struct nf_conn *)ev->ct_id;

		if (ct)
			ev->netns = HT_READ(ct, ct_net.net, ns.inum);
		return;
	}
	ev->ifindex = HT_LOAD(btf, dev, ifindex);
	net = HT_LOAD(btf, dev, nd_net.net);
	ev->netns = HT_LOAD(btf, net, ns.inum);
#if HT_DIRECT_READS
	__builtin_memcpy(ev->dev, HT_CAST(struct net_device, dev)->name, HT_DEV_LEN);
#else
	HT_READ_STR(&ev->dev, dev, name);
#endif
}

/* Batch the reader's wake-ups: wake it only when enough data waits; it also
 * polls on a short timeout, so a lone event is never stuck. */
static __always_inline void emit_event(void *ctx, struct ht_event *ev)
{
	__u64 flags = BPF_RB_NO_WAKEUP;
	__u16 pt = ev->point < HT_PT_MAX ? ev->point : 0;

	/* Wake the reader once per HT_WAKEUP_BYTES of pending data: when this record
	 * crosses a multiple of it. Waking on every event past the threshold made the
	 * traced path pay an IRQ-work interrupt per event whenever the reader lagged;
	 * a crossing missed between CPUs is caught by the reader's own poll timeout. */
	__u64 avail = HT_RB_AVAIL(events);

	if (avail / HT_WAKEUP_BYTES != (avail + sizeof(*ev) + 8) / HT_WAKEUP_BYTES)
		flags = BPF_RB_FORCE_WAKEUP;
	if (HT_OUTPUT(ctx, events, ev, sizeof(*ev), flags)) {
		HT_COUNT(ht_lost, pt);
		return;
	}
	HT_COUNT(ht_emitted, pt);
}

/* Where, in which stage, and point-specific detail of one observation. */
struct ht_where {
	void *ctx; /* the program's context: the perf buffer (bcc build) needs it */
	const struct net_device *dev;
	__u16 point;
	__u8 hook;
	__s32 prio;
	__u32 aux;
	bool ct_fallback; /* a packet may match only through its conntrack entry here */
	bool btf;         /* skb and dev are BTF-typed: direct loads (HT_LOAD) */
};

#define HT_TCP_FIN 0x01
#define HT_TCP_SYN 0x02
#define HT_TCP_RST 0x04

/* Past its data budget? Every point of a packet's path counts the same
 * packets in the same order, so the first data_budget packets of a flow keep
 * all their hops and later ones lose all of them. A bulk transfer (or a UDP
 * stream: every datagram counts) then costs one map lookup per packet and
 * point instead of an event. */
static __always_inline bool over_budget(const struct ht_event *ev, const struct ht_where *w,
					const struct net_device *dev, bool btf)
{
	struct ht_budget_key key = {
		.flow = { .saddr = ev->pkt.saddr, .daddr = ev->pkt.daddr,
			  .sport = ev->pkt.sport, .dport = ev->pkt.dport, .proto = ev->proto },
		.point = w->point,
	};
	__u32 one = 1, *seen;

	/* TCP segments and UDP datagrams. ICMP errors, resets and drops of TCP segments
	 * always go; drops of UDP datagrams count too (a flood into a full socket buffer
	 * would cost an event per datagram), so a UDP flow's first drops per point go. */
	if (!ht_cfg.data_budget || ev->proto == IPPROTO_ICMP ||
	    (w->point == HT_PT_DROP && ev->proto == IPPROTO_TCP) ||
	    w->point == HT_PT_TCP_RESET || w->point == HT_PT_TCP_V4_SEND_RESET)
		return false;
	if (dev)
		key.ifindex = HT_LOAD(btf, dev, ifindex);
	if (ev->tcp_flags & (HT_TCP_SYN | HT_TCP_FIN | HT_TCP_RST)) {
		if (ev->tcp_flags & HT_TCP_SYN) /* a new connection on this tuple */
			HT_DELETE(budgets, &key);
		return false;
	}
	seen = HT_LOOKUP(budgets, &key);
	if (!seen) {
		HT_INSERT(budgets, &key, &one);
		return false;
	}
	if (*seen >= ht_cfg.data_budget) {
		HT_COUNT(ht_over_budget, w->point < HT_PT_MAX ? w->point : 0);
		return true;
	}
	__sync_fetch_and_add(seen, 1);
	return false;
}

/* Fill, learn from and emit the event of one packet at one point; how: what
 * ours() found (HT_UNDECIDED: decide here, from the full read). ev may come
 * pre-filled (NAT manip: the tuple after manipulation). */
static __always_inline int trace_event(const struct sk_buff *skb, const struct ht_where *w,
				       struct ht_event *ev, bool parsed, int how)
{
	if (HT_FLOOR || !skb || how == HT_NOT_OURS)
		return 0;
	if (!parsed && read_packet(skb, ev, w->btf))
		return 0;
	if (how == HT_UNDECIDED)
		how = match_flow(&ev->pkt, flow_proto(ev)) ? HT_BY_TUPLE : HT_BY_CT;
	if (how == HT_BY_CT) {
		/* After DNAT the packet no longer carries the VIP and its new
		 * tuple may not be learned yet: its conntrack entry tells. */
		if (!w->ct_fallback || !read_ct(skb, ev, w->btf, true))
			return 0;
		if (!learn_ct(ev) || over_budget(ev, w, w->dev, w->btf))
			return 0;
	} else {
		/* Before conntrack is read: past its budget, a packet of a bulk
		 * transfer costs this lookup only (its tuples were learned from the
		 * handshake, which is never over budget). */
		if (over_budget(ev, w, w->dev, w->btf))
			return 0;
		read_ct(skb, ev, w->btf, false);
		learn_ct(ev);
	}
	ev->ts_ns = bpf_ktime_get_ns();
	ev->skb = (__u64)skb;
	ev->point = w->point;
	ev->hook = w->hook;
	ev->nf_prio = w->prio;
	ev->aux = w->aux;
	read_dev(w->dev, ev, w->btf);
	emit_event(w->ctx, ev);
	return 0;
}

/* ours() first; an event (zeroed only for a packet that is ours) after. */
static __always_inline int trace_ours(const struct sk_buff *skb, const struct ht_where *w)
{
	int how;

	if (HT_FLOOR || !skb)
		return 0;
	how = ours(skb, w->ct_fallback, w->btf);
	if (how == HT_NOT_OURS)
		return 0;
	{
		struct ht_event ev = {};

		return trace_event(skb, w, &ev, false, how);
	}
}

/* Common path of every skb-carrying point. */
static __always_inline int trace_skb(void *ctx, const struct sk_buff *skb,
				     const struct net_device *dev, __u16 point, __u8 hook, __s32 prio,
				     bool ct_fallback, bool btf)
{
	struct ht_where w = { .ctx = ctx, .dev = dev, .point = point, .hook = hook, .prio = prio,
			      .ct_fallback = ct_fallback, .btf = btf };

	return trace_ours(skb, &w);
}

/* ---------------------------------------------- tracepoint provider: devices
 * tp_btf in the CO-RE build (BTF-typed arguments: HT_TP_BTF), raw tracepoints
 * with the same arguments in the bcc build. */

static __always_inline int on_dev_rx(void *ctx, const struct sk_buff *skb, bool btf)
{
	if (HT_FLOOR || HT_LOAD(btf, skb, protocol) != bpf_htons(HT_ETH_P_IP))
		return 0;
	return trace_skb(ctx, skb, HT_LOAD(btf, skb, dev), HT_PT_DEV_RX, 0xff, 0, false, btf);
}

static __always_inline int on_dev_tx(void *ctx, const struct sk_buff *skb,
				     const struct net_device *dev, bool btf)
{
	if (HT_FLOOR || HT_LOAD(btf, skb, protocol) != bpf_htons(HT_ETH_P_IP))
		return 0;
	return trace_skb(ctx, skb, dev, HT_PT_DEV_TX, 0xff, 0, false, btf);
}

static __always_inline int on_drop(void *ctx, struct sk_buff *skb, void *location, __u32 reason,
				   bool btf)
{
	struct ht_where w = { .ctx = ctx, .point = HT_PT_DROP, .hook = 0xff, .btf = btf };
	int how;

	if (HT_FLOOR || !skb || HT_LOAD(btf, skb, protocol) != bpf_htons(HT_ETH_P_IP))
		return 0;
	how = ours(skb, false, btf);
	if (how == HT_NOT_OURS)
		return 0;
	w.dev = HT_LOAD(btf, skb, dev);
	{
		struct ht_event ev = { .location = (__u64)location, .reason = reason };

		return trace_event(skb, &w, &ev, false, how);
	}
}

HT_TP(ht_dev_rx, netif_receive_skb, struct sk_buff *skb)
{
	return on_dev_rx(ctx, skb, HT_TP_BTF);
}

HT_TP(ht_dev_tx, net_dev_start_xmit, const struct sk_buff *skb, const struct net_device *dev)
{
	return on_dev_tx(ctx, skb, dev, HT_TP_BTF);
}

/* bcc on kernels before 5.17: kfree_skb has no drop reason (the loader says so) */
#ifdef HT_KFREE_SKB_NO_REASON
HT_TP(ht_drop, kfree_skb, struct sk_buff *skb, void *location)
#define HT_DROP_REASON 0
#else
HT_TP(ht_drop, kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
#define HT_DROP_REASON reason
#endif
{
	return on_drop(ctx, skb, location, HT_DROP_REASON, HT_TP_BTF);
}

#ifndef HT_BCC
/* Raw-tracepoint twins of the device and drop tracepoints, for the kprobe
 * provider on a kernel without BTF of its own (CO-RE relocated with --btf):
 * tp_btf needs the kernel's BTF, raw_tp does not. Arguments are plain
 * addresses there, read like kprobe arguments. */
SEC("raw_tp/netif_receive_skb")
int BPF_PROG(ht_rtp_dev_rx, struct sk_buff *skb)
{
	return on_dev_rx(ctx, skb, false);
}

SEC("raw_tp/net_dev_start_xmit")
int BPF_PROG(ht_rtp_dev_tx, const struct sk_buff *skb, const struct net_device *dev)
{
	return on_dev_tx(ctx, skb, dev, false);
}

SEC("raw_tp/kfree_skb")
int BPF_PROG(ht_rtp_drop, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	return on_drop(ctx, skb, location, reason, false);
}

/* kfree_skb before Linux 5.17: no drop reason (the loader picks by the format file) */
SEC("raw_tp/kfree_skb")
int BPF_PROG(ht_rtp_drop_noreason, struct sk_buff *skb, void *location)
{
	return on_drop(ctx, skb, location, 0, false);
}
#endif

/* The skb is the packet being answered with a reset; NULL for resets a
 * socket sends on its own (the verifier insists on the check). */
HT_TP(ht_tcp_reset, tcp_send_reset, const struct sock *sk, const struct sk_buff *skb)
{
	if (!skb)
		return 0;
	return trace_skb(ctx, skb, HT_LOAD(HT_TP_BTF, skb, dev), HT_PT_TCP_RESET, 0xff, 0, false,
			 HT_TP_BTF);
}

#ifndef HT_BCC
/* --------------------------------- tracepoint provider: netfilter hooks
 * Program type and hook/priority are set by the loader (libbpf 1.1 does not
 * know SEC("netfilter")); the priority each program is attached at is
 * repeated here so the event says where it was taken. CO-RE build only
 * (BPF netfilter links need BTF and Linux 6.4). */

static __always_inline int trace_nf(struct bpf_nf_ctx *ctx, __u16 point, __s32 prio)
{
	if (HT_FLOOR)
		return HT_NF_ACCEPT;
	const struct nf_hook_state *state = ctx->state;
	struct sk_buff *skb = ctx->skb;
	struct net_device *in = state->in;

	trace_skb(ctx, skb, in ? in : state->out, point, state->hook, prio, true, true);
	return HT_NF_ACCEPT;
}

#define HT_NF_PROG(name, point, prio)                       \
	SEC("netfilter")                                    \
	int name(struct bpf_nf_ctx *ctx)                    \
	{                                                   \
		return trace_nf(ctx, point, prio);          \
	}

HT_NF_PROG(ht_nf_pre_ct, HT_PT_NF_PRE_CT, -199)
HT_NF_PROG(ht_nf_pre_nat, HT_PT_NF_PRE_NAT, -99)
HT_NF_PROG(ht_nf_out_ct, HT_PT_NF_OUT_CT, -199)
HT_NF_PROG(ht_nf_out_nat, HT_PT_NF_OUT_NAT, -99)
HT_NF_PROG(ht_nf_forward, HT_PT_NF_FORWARD, 1)
HT_NF_PROG(ht_nf_post_nat, HT_PT_NF_POST_NAT, 101)
HT_NF_PROG(ht_nf_in_nat, HT_PT_NF_IN_NAT, 101)
#endif /* !HT_BCC */

/* ------------------------------------ fentry / kprobe providers: functions
 * One helper per kernel function, called by a thin fentry (or fexit) entry
 * point and a thin kprobe entry point with the same arguments. */

static __always_inline int on_skb(void *ctx, const struct sk_buff *skb,
				  const struct net_device *dev, __u16 point, bool btf)
{
	return trace_skb(ctx, skb, dev, point, 0xff, 0, false, btf);
}

static __always_inline int on_br_handle_frame(void *ctx, struct sk_buff **pskb)
{
	struct sk_buff *skb = NULL;

	if (HT_COPY(&skb, sizeof(skb), pskb) || !skb)
		return 0;
	return on_skb(ctx, skb, HT_READ(skb, dev), HT_PT_BR_HANDLE_FRAME, false);
}

/* The device of a bridge forward is the egress port. */
static __always_inline int on_br_forward(void *ctx, const struct net_bridge_port *to,
					 struct sk_buff *skb, bool btf)
{
	return on_skb(ctx, skb, HT_LOAD(btf, to, dev), HT_PT_BR_FORWARD, btf);
}

static __always_inline int on_hook_fn(void *ctx, struct sk_buff *skb,
				      const struct nf_hook_state *state, __u16 point, __u32 aux,
				      bool btf)
{
	struct net_device *in = HT_LOAD(btf, state, in);
	struct ht_where w = { .ctx = ctx, .dev = in ? in : HT_LOAD(btf, state, out),
			      .point = point, .hook = HT_LOAD(btf, state, hook), .aux = aux,
			      .ct_fallback = true, .btf = btf };

	return trace_ours(skb, &w);
}

/* nf_nat_manip_pkt(skb, ct, mtype, dir): the event carries the tuple the
 * manipulation produces, computed the way the kernel does (the inverse of the
 * other direction's tuple), so entry-only kprobes report it as well as fentry. */
static __always_inline int on_nat_manip(void *ctx, struct sk_buff *skb, struct nf_conn *ct,
					__u32 mtype, __u32 dir, bool btf)
{
	struct ht_where w = { .ctx = ctx, .point = HT_PT_NAT_MANIP, .hook = 0xff,
			      .aux = mtype | dir << 8 | HT_AUX_VALID, .ct_fallback = true, .btf = btf };
	struct ht_event ev = {};
	struct ht_tuple other;

	if (!skb || !ct || read_packet(skb, &ev, btf) || ev.proto == IPPROTO_ICMP)
		return 0;
	w.dev = HT_LOAD(btf, skb, dev);
	read_ct_tuple(&ct->tuplehash[dir ? 0 : 1].tuple, &other);
	if (mtype == 0) { /* NF_NAT_MANIP_SRC */
		ev.pkt.saddr = other.daddr;
		ev.pkt.sport = other.dport;
	} else {
		ev.pkt.daddr = other.saddr;
		ev.pkt.dport = other.sport;
	}
	return trace_event(skb, &w, &ev, true, HT_UNDECIDED);
}

/* nf_nat_setup_info: the binding is chosen; learn its tuples (no packet). */
static __always_inline int on_nat_setup(struct nf_conn *ct)
{
	struct ht_event ev = { .ct_flags = HT_CT_PRESENT, .ct_id = (__u64)ct };

	if (HT_FLOOR || !ct)
		return 0;
	ev.proto = read_ct_tuple(&ct->tuplehash[0].tuple, &ev.ct_orig);
	if (!traced_proto(ev.proto))
		return 0;
	read_ct_tuple(&ct->tuplehash[1].tuple, &ev.ct_reply);
	learn_ct(&ev);
	return 0;
}

#ifndef HT_BCC
/* fentry / fexit: CO-RE build only (trampolines need BTF). */
SEC("fentry/br_handle_frame")
int BPF_PROG(ht_fe_br_handle_frame, struct sk_buff **pskb)
{
	return on_br_handle_frame(ctx, pskb);
}

SEC("fentry/br_forward")
int BPF_PROG(ht_fe_br_forward, const struct net_bridge_port *to, struct sk_buff *skb)
{
	return on_br_forward(ctx, to, skb, true);
}

SEC("fentry/br_pass_frame_up")
int BPF_PROG(ht_fe_br_pass_up, struct sk_buff *skb)
{
	return on_skb(ctx, skb, HT_LOAD(true, skb, dev), HT_PT_BR_PASS_UP, true);
}

SEC("fentry/br_dev_xmit")
int BPF_PROG(ht_fe_br_dev_xmit, struct sk_buff *skb, struct net_device *dev)
{
	return on_skb(ctx, skb, dev, HT_PT_BR_DEV_XMIT, true);
}

SEC("fentry/br_nf_pre_routing")
int BPF_PROG(ht_fe_br_nf_pre_routing, void *priv, struct sk_buff *skb,
	     const struct nf_hook_state *state)
{
	return on_hook_fn(ctx, skb, state, HT_PT_BR_NF_PRE_ROUTING, 0, true);
}

/* fexit: the entry is attached by then, and the verdict is known. */
SEC("fexit/nf_conntrack_in")
int BPF_PROG(ht_fx_ct_in, struct sk_buff *skb, const struct nf_hook_state *state,
	     unsigned int ret)
{
	return on_hook_fn(ctx, skb, state, HT_PT_CT_IN, ret | HT_AUX_VALID, true);
}

SEC("fexit/__nf_conntrack_confirm")
int BPF_PROG(ht_fx_ct_confirm, struct sk_buff *skb, int ret)
{
	return trace_skb(ctx, skb, HT_LOAD(true, skb, dev), HT_PT_CT_CONFIRM, 0xff, 0, true, true);
}

SEC("fentry/nf_nat_manip_pkt")
int BPF_PROG(ht_fe_nat_manip, struct sk_buff *skb, struct nf_conn *ct, int mtype, int dir)
{
	return on_nat_manip(ctx, skb, ct, mtype, dir, true);
}

SEC("fexit/nf_nat_setup_info")
int BPF_PROG(ht_fx_nat_setup, struct nf_conn *ct)
{
	return on_nat_setup(ct);
}

SEC("fentry/tcp_v4_send_reset")
int BPF_PROG(ht_fe_tcp_v4_send_reset, const struct sock *sk, struct sk_buff *skb)
{
	if (!skb)
		return 0;
	return on_skb(ctx, skb, HT_LOAD(true, skb, dev), HT_PT_TCP_V4_SEND_RESET, true);
}
#endif /* !HT_BCC */

/* kprobes: both builds (HT_KPROBE in compat.h); arguments are plain addresses. */
HT_KPROBE(ht_kp_br_handle_frame, br_handle_frame, struct sk_buff **pskb)
{
	return on_br_handle_frame(ctx, pskb);
}

HT_KPROBE(ht_kp_br_forward, br_forward, const struct net_bridge_port *to, struct sk_buff *skb)
{
	return on_br_forward(ctx, to, skb, false);
}

HT_KPROBE(ht_kp_br_pass_up, br_pass_frame_up, struct sk_buff *skb)
{
	return on_skb(ctx, skb, HT_LOAD(false, skb, dev), HT_PT_BR_PASS_UP, false);
}

HT_KPROBE(ht_kp_br_dev_xmit, br_dev_xmit, struct sk_buff *skb, struct net_device *dev)
{
	return on_skb(ctx, skb, dev, HT_PT_BR_DEV_XMIT, false);
}

HT_KPROBE(ht_kp_br_nf_pre_routing, br_nf_pre_routing, void *priv, struct sk_buff *skb,
	  const struct nf_hook_state *state)
{
	return on_hook_fn(ctx, skb, state, HT_PT_BR_NF_PRE_ROUTING, 0, false);
}

/* At entry the packet has no conntrack entry yet (no verdict either): the
 * event proves conntrack saw it; NAT and confirm events carry the entry. */
HT_KPROBE(ht_kp_ct_in, nf_conntrack_in, struct sk_buff *skb, const struct nf_hook_state *state)
{
	return on_hook_fn(ctx, skb, state, HT_PT_CT_IN, 0, false);
}

HT_KPROBE(ht_kp_ct_confirm, __nf_conntrack_confirm, struct sk_buff *skb)
{
	return trace_skb(ctx, skb, HT_LOAD(false, skb, dev), HT_PT_CT_CONFIRM, 0xff, 0, true, false);
}

/* No kprobe on nf_nat_setup_info: at its entry the binding is not chosen
 * yet; the kprobe provider learns the NATed tuples from nf_nat_manip_pkt. */
HT_KPROBE(ht_kp_nat_manip, nf_nat_manip_pkt, struct sk_buff *skb, struct nf_conn *ct, int mtype,
	  int dir)
{
	return on_nat_manip(ctx, skb, ct, mtype, dir, false);
}

HT_KPROBE(ht_kp_tcp_v4_send_reset, tcp_v4_send_reset, const struct sock *sk, struct sk_buff *skb)
{
	if (!skb)
		return 0;
	return on_skb(ctx, skb, HT_LOAD(false, skb, dev), HT_PT_TCP_V4_SEND_RESET, false);
}
