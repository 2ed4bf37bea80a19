#!/usr/bin/env bash
# seed-lab.sh: build the seed bug's topology by hand, independently of tracer/lab.
#
# Pod A (netns poda, 100.96.54.240) curls ClusterIP 100.67.30.133:80, which
# kube-proxy-style iptables rules in the "node" netns DNAT to pod B (netns podb,
# 100.96.54.247:80) on the same bridge cni0. With
# net.bridge.bridge-nf-call-iptables=0 in the node netns the reply is bridged
# back un-NATed, pod A answers RST and curl times out; with 1 it works.
#
# A second Service, kube-system/kube-dns (ClusterIP 100.67.30.140, ports 53/udp "dns"
# and 53/tcp "dns-tcp"), has the same endpoint, where dnsmasq answers
# export.prod.svc.cluster.local. With 0 a UDP query through it times out (the reply
# is bridged back un-NATed too), with 1 it answers:
#   ip netns exec poda dig @100.67.30.140 export.prod.svc.cluster.local +time=2 +tries=1
#
# With SEED_LAB_STATUS=1, a third, prod/status (ClusterIP 100.67.30.134:80), is healthy
# whatever the knob: its
# endpoint is the node itself (an HTTP server in the node netns on cni0's address
# 100.96.54.1, as the apiserver's host-network endpoint is for default/kubernetes), so
# its replies leave through the node's own netfilter and are reverse-translated:
#   hairtrace --svc 100.64.0.0/10 --netns node -- ...  shows prod/export broken, it ok.
#
# Plain ip / sysctl / iptables-restore only (no CNI), so hairtrace can be shown
# to work on a topology it did not build. Only the namespaces node, poda and
# podb are touched, never the caller's own netns.
#
# usage: seed-lab.sh up [0|1]   build it (default 0 = broken)
#        seed-lab.sh down       remove it (safe to run when nothing exists)
# env:   SEED_LAB_NODE, SEED_LAB_POD_A, SEED_LAB_POD_B override the namespace names.
#        SEED_LAB_SELF=1: the Service's one endpoint is pod A itself (a pod calling its
#        own Service: hairpin on its bridge port, kube-proxy's masquerade of it).
#        SEED_LAB_STATUS=1: also Service prod/status, endpoint the node (see above).
set -euo pipefail

# Namespace names; override (e.g. in tests) to run beside another copy of the lab.
NODE=${SEED_LAB_NODE:-node}
POD_A=${SEED_LAB_POD_A:-poda}
POD_B=${SEED_LAB_POD_B:-podb}
BRIDGE=cni0
BRIDGE_IP=100.96.54.1
POD_A_IP=100.96.54.240
POD_B_IP=100.96.54.247
SERVICE_IP=100.67.30.133
DNS_IP=100.67.30.140
STATUS_IP=100.67.30.134
if [[ ${SEED_LAB_SELF:-0} == 1 ]]; then
	BACKEND_NS=$POD_A BACKEND_IP=$POD_A_IP BACKEND_LABEL="pod A"
else
	BACKEND_NS=$POD_B BACKEND_IP=$POD_B_IP BACKEND_LABEL="pod B"
fi
CLUSTER_CIDR=100.96.0.0/11
MTU=1450
STATE_DIR=/run/hairtrace/seed-lab-sh/$NODE
PYTHON=${PYTHON:-python3}

die() { echo "seed-lab: $*" >&2; exit 1; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
ns_exists() { [[ -e /run/netns/$1 ]]; }

# kp_hash TEXT: the hash kube-proxy puts in chain names, base32(sha256(TEXT)) cut to 16.
kp_hash() {
	local hex
	hex=$(printf '%s' "$1" | sha256sum)
	printf '%b' "$(printf '%s' "${hex%% *}" | sed 's/../\\x&/g')" | base32 | cut -c1-16
}

# The Service ports, one a line: kube-proxy's ServicePortName, protocol, ClusterIP, port
# and the one endpoint. kube-proxy names the chains KUBE-SVC-hash(name protocol) and
# KUBE-SEP-hash(name protocol endpoint).
service_ports() {
	echo "prod/export tcp $SERVICE_IP 80 $BACKEND_IP:80"
	echo "kube-system/kube-dns:dns udp $DNS_IP 53 $BACKEND_IP:53"
	echo "kube-system/kube-dns:dns-tcp tcp $DNS_IP 53 $BACKEND_IP:53"
	if [[ ${SEED_LAB_STATUS:-0} == 1 ]]; then
		echo "prod/status tcp $STATUS_IP 80 $BRIDGE_IP:80"
	fi
}

# The nat table as kube-proxy (iptables mode) writes it for Services prod/export
# (unnamed port 80/TCP) and kube-system/kube-dns (53/UDP, 53/TCP), one endpoint each.
nat_rules() {
	local name proto ip port ep svc sep
	cat <<EOF
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
EOF
	while read -r name proto ip port ep; do
		echo ":KUBE-SVC-$(kp_hash "$name$proto") - [0:0]"
		echo ":KUBE-SEP-$(kp_hash "$name$proto$ep") - [0:0]"
	done < <(service_ports)
	cat <<EOF
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
EOF
	while read -r name proto ip port ep; do
		echo "-A KUBE-SERVICES -d $ip/32 -p $proto -m comment --comment \"$name cluster IP\"" \
			"-m $proto --dport $port -j KUBE-SVC-$(kp_hash "$name$proto")"
	done < <(service_ports)
	echo '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must' \
		'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
	while read -r name proto ip port ep; do
		svc=KUBE-SVC-$(kp_hash "$name$proto")
		sep=KUBE-SEP-$(kp_hash "$name$proto$ep")
		cat <<EOF
-A $svc ! -s $CLUSTER_CIDR -d $ip/32 -p $proto -m comment --comment "$name cluster IP" -m $proto --dport $port -j KUBE-MARK-MASQ
-A $svc -m comment --comment "$name -> $ep" -j $sep
-A $sep -s ${ep%:*}/32 -m comment --comment "$name" -j KUBE-MARK-MASQ
-A $sep -p $proto -m comment --comment "$name" -m $proto -j DNAT --to-destination $ep
EOF
	done < <(service_ports)
	echo COMMIT
}

# plug_pod NS IP HOST_IF: a pod netns with eth0 on a veth whose other end is a cni0 port.
plug_pod() {
	local ns=$1 ip=$2 host_if=$3
	ip netns add "$ns"
	in_ns "$ns" ip link set lo up
	in_ns "$NODE" ip link add "$host_if" mtu "$MTU" type veth peer name eth0 mtu "$MTU" netns "$ns"
	in_ns "$NODE" ip link set "$host_if" master "$BRIDGE"
	in_ns "$NODE" bridge link set dev "$host_if" hairpin on
	in_ns "$NODE" ip link set "$host_if" up
	in_ns "$ns" ip addr add "$ip/24" dev eth0
	in_ns "$ns" ip link set eth0 up
	in_ns "$ns" ip route add "$CLUSTER_CIDR" via "$BRIDGE_IP" dev eth0
	in_ns "$ns" ip route add default via "$BRIDGE_IP" dev eth0
}

start_server() {
	mkdir -p "$STATE_DIR/www"
	echo "seed-lab.sh: $BACKEND_LABEL $BACKEND_IP" >"$STATE_DIR/www/index.html"
	rm -f "$STATE_DIR/server.pid"
	# setsid -f detaches the server; sh records its own pid, kept through both execs.
	setsid -f sh -c 'echo $$ >"$0"; exec "$@"' "$STATE_DIR/server.pid" \
		ip netns exec "$BACKEND_NS" "$PYTHON" -m http.server 80 --bind "$BACKEND_IP" \
		--directory "$STATE_DIR/www" </dev/null >"$STATE_DIR/server.log" 2>&1
	local i
	for i in $(seq 50); do
		if in_ns "$POD_A" curl -s -o /dev/null -m 1 "http://$BACKEND_IP/"; then
			return 0
		fi
		sleep 0.1
	done
	die "the backend's HTTP server did not answer pod A: $(tail -n 1 "$STATE_DIR/server.log" 2>/dev/null)"
}

# start_dns: kube-dns's backend, dnsmasq on the backend's pod IP port 53 (UDP and TCP),
# answering from its own records only (no upstream, no /etc/hosts, no config file). It
# stays root (--user=root) rather than dropping to nobody, and logs every query.
start_dns() {
	rm -f "$STATE_DIR/dnsmasq.pid"
	setsid -f sh -c 'echo $$ >"$0"; exec "$@"' "$STATE_DIR/dnsmasq.pid" \
		ip netns exec "$BACKEND_NS" dnsmasq --keep-in-foreground --conf-file=/dev/null \
		--no-resolv --no-hosts --user=root --group=root --pid-file= \
		--log-facility="$STATE_DIR/dnsmasq.log" --log-queries \
		--listen-address="$BACKEND_IP" --bind-dynamic --port=53 --local=/cluster.local/ \
		--host-record="export.prod.svc.cluster.local,$SERVICE_IP" \
		--host-record="kube-dns.kube-system.svc.cluster.local,$DNS_IP" \
		</dev/null >>"$STATE_DIR/dnsmasq.log" 2>&1
	local i
	for i in $(seq 50); do
		if [[ $(in_ns "$POD_A" dig +short +time=1 +tries=1 "@$BACKEND_IP" export.prod.svc.cluster.local 2>/dev/null) == "$SERVICE_IP" ]]; then
			return 0
		fi
		sleep 0.1
	done
	die "the backend's DNS server did not answer pod A: $(tail -n 1 "$STATE_DIR/dnsmasq.log" 2>/dev/null)"
}

# start_status: prod/status's endpoint, an HTTP server in the node netns on cni0's address.
start_status() {
	mkdir -p "$STATE_DIR/status"
	echo "seed-lab.sh: node $BRIDGE_IP" >"$STATE_DIR/status/index.html"
	rm -f "$STATE_DIR/status.pid"
	setsid -f sh -c 'echo $$ >"$0"; exec "$@"' "$STATE_DIR/status.pid" \
		ip netns exec "$NODE" "$PYTHON" -m http.server 80 --bind "$BRIDGE_IP" \
		--directory "$STATE_DIR/status" </dev/null >"$STATE_DIR/status.log" 2>&1
	local i
	for i in $(seq 50); do
		if in_ns "$POD_A" curl -s -o /dev/null -m 1 "http://$BRIDGE_IP/"; then
			return 0
		fi
		sleep 0.1
	done
	die "the node's HTTP server did not answer pod A: $(tail -n 1 "$STATE_DIR/status.log" 2>/dev/null)"
}

do_up() {
	local knob=$1
	[[ $knob == 0 || $knob == 1 ]] || die "bridge-nf-call-iptables must be 0 or 1, not '$knob'"
	local ns
	for ns in "$NODE" "$POD_A" "$POD_B"; do
		! ns_exists "$ns" || die "netns $ns already exists; run '$0 down' first"
	done
	local tool
	for tool in dnsmasq dig; do
		command -v "$tool" >/dev/null ||
			die "$tool not found (Debian packages dnsmasq-base, bind9-dnsutils: run scripts/setup)"
	done
	# From here on, any failure (set -e or die) tears down what was built.
	trap 'rc=$?; if ((rc != 0)); then echo "seed-lab: up failed; tearing down" >&2; do_down >/dev/null 2>&1 || true; fi' EXIT
	mkdir -p "$STATE_DIR"

	ip netns add "$NODE"
	in_ns "$NODE" ip link set lo up
	in_ns "$NODE" sysctl -q -w net.ipv4.ip_forward=1
	in_ns "$NODE" ip link add "$BRIDGE" mtu "$MTU" type bridge
	in_ns "$NODE" ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
	in_ns "$NODE" ip link set "$BRIDGE" up
	in_ns "$NODE" test -e /proc/sys/net/bridge/bridge-nf-call-iptables ||
		die "net.bridge.bridge-nf-call-iptables missing in netns $NODE (no br_netfilter)"
	in_ns "$NODE" sysctl -q -w "net.bridge.bridge-nf-call-iptables=$knob"

	plug_pod "$POD_A" "$POD_A_IP" veth-poda
	plug_pod "$POD_B" "$POD_B_IP" veth-podb

	nat_rules | in_ns "$NODE" iptables-restore
	start_server
	start_dns
	if [[ ${SEED_LAB_STATUS:-0} == 1 ]]; then
		start_status
	fi
	trap - EXIT
	echo "seed-lab: up (bridge-nf-call-iptables=$knob); try: ip netns exec $POD_A curl -m 3 http://$SERVICE_IP/"
	echo "  or: ip netns exec $POD_A dig @$DNS_IP export.prod.svc.cluster.local +time=2 +tries=1"
}

# kill_pid PID: SIGTERM, then SIGKILL if it lingers.
kill_pid() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for i in $(seq 20); do
		kill -0 "$pid" 2>/dev/null || return 0
		[[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
}

do_down() {
	local pid ns what
	# each recorded pid, if it is still that program (not a reused pid)
	for what in server:http.server dnsmasq:dnsmasq status:http.server; do
		if [[ -f $STATE_DIR/${what%%:*}.pid ]]; then
			pid=$(cat "$STATE_DIR/${what%%:*}.pid")
			if [[ $pid =~ ^[0-9]+$ ]] && grep -qa "${what#*:}" "/proc/$pid/cmdline" 2>/dev/null; then
				kill_pid "$pid"
			fi
		fi
	done
	for ns in "$POD_A" "$POD_B"; do
		if ns_exists "$ns"; then
			for pid in $(ip netns pids "$ns"); do
				kill_pid "$pid"
			done
		fi
	done
	for ns in "$POD_A" "$POD_B" "$NODE"; do
		if ns_exists "$ns"; then
			ip netns delete "$ns"
		fi
	done
	rm -rf "$STATE_DIR"
	echo "seed-lab: down"
}

main() {
	[[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
	case ${1:-} in
	up) do_up "${2:-0}" ;;
	down) do_down ;;
	*) die "usage: $0 up [0|1] | down" ;;
	esac
}

main "$@"
