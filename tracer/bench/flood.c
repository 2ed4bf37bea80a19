// SPDX-License-Identifier: Apache-2.0
/*
 * flood.c - scripts/bench's UDP small-packet traffic (compiled at bench time).
 *
 *   flood send DST_IP PORT SECONDS [PAYLOAD_BYTES]
 *       sendmmsg() batches of small datagrams to DST_IP:PORT for SECONDS;
 *       prints "sent N seconds S errors E" on exit.
 *   flood sink PORT
 *       binds UDP PORT and never reads it, so datagrams end in the socket
 *       (no ICMP port-unreachable replies) without costing a reader; exits on
 *       SIGTERM. The receiving side counts packets from its netns' counters.
 *   flood tcp-send DST_IP PORT SECONDS [WRITE_BYTES]
 *       one TCP connection, TCP_NODELAY, small write()s for SECONDS;
 *       prints "sent N seconds S errors 0" (N writes).
 *   flood tcp-sink PORT
 *       accepts connections one after another and reads them in 64 KiB
 *       blocks until EOF (a reader that never becomes the bottleneck).
 *   flood tcp-conns DST_IP PORT SECONDS
 *       short connections one after another for SECONDS: connect, one 64-byte
 *       write, close; prints "sent N seconds S errors E" (N connections).
 *   flood spin SECONDS
 *       burns one CPU for SECONDS (the bench's busy neighbour).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int udp_socket(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);

	if (fd < 0) {
		perror("socket");
		exit(1);
	}
	return fd;
}

static int do_send(const char *ip, int port, double seconds, size_t payload)
{
	struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct mmsghdr msgs[BATCH];
	struct iovec iov;
	char buf[1472] = "hairtrace-bench";
	unsigned long long sent = 0, errors = 0;
	double t0, t;
	int fd = udp_socket(), i;

	if (payload > sizeof(buf))
		payload = sizeof(buf);
	if (inet_pton(AF_INET, ip, &dst.sin_addr) != 1) {
		fprintf(stderr, "flood: bad address %s\n", ip);
		return 2;
	}
	if (connect(fd, (struct sockaddr *)&dst, sizeof(dst))) {
		perror("connect");
		return 1;
	}
	iov.iov_base = buf;
	iov.iov_len = payload;
	memset(msgs, 0, sizeof(msgs));
	for (i = 0; i < BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	t0 = now();
	do {
		int n = sendmmsg(fd, msgs, BATCH, 0);

		if (n > 0)
			sent += n;
		else if (errno == ENOBUFS || errno == EAGAIN || errno == ECONNREFUSED)
			errors++;
		else {
			perror("sendmmsg");
			return 1;
		}
		t = now();
	} while (t - t0 < seconds);
	printf("sent %llu seconds %.6f errors %llu\n", sent, t - t0, errors);
	return 0;
}

static void on_term(int sig)
{
	(void)sig;
	_exit(0);
}

static int do_sink(int port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	int fd = udp_socket(), small = 4096;

	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr))) {
		perror("bind");
		return 1;
	}
	signal(SIGTERM, on_term);
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
}

static int do_tcp_send(const char *ip, int port, double seconds, size_t size)
{
	struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(port) };
	char buf[1448] = "hairtrace-bench";
	unsigned long long sent = 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	double t0, t;

	if (size > sizeof(buf))
		size = sizeof(buf);
	if (fd < 0 || inet_pton(AF_INET, ip, &dst.sin_addr) != 1) {
		fprintf(stderr, "flood: bad socket or address %s\n", ip);
		return 2;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&dst, sizeof(dst))) {
		perror("connect");
		return 1;
	}
	t0 = now();
	do {
		if (write(fd, buf, size) != (ssize_t)size) {
			perror("write");
			return 1;
		}
		sent++;
		t = now();
	} while (t - t0 < seconds);
	close(fd);
	printf("sent %llu seconds %.6f errors 0\n", sent, t - t0);
	return 0;
}

static int do_tcp_sink(int port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	static char buf[65536];
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) || listen(fd, 256)) {
		perror("tcp-sink");
		return 1;
	}
	signal(SIGTERM, on_term);
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		int c = accept(fd, NULL, NULL);

		if (c < 0)
			continue;
		while (read(c, buf, sizeof(buf)) > 0)
			;
		close(c);
	}
}

static int do_tcp_conns(const char *ip, int port, double seconds)
{
	struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(port) };
	char buf[64] = "hairtrace-bench";
	unsigned long long conns = 0, errors = 0;
	double t0, t;

	if (inet_pton(AF_INET, ip, &dst.sin_addr) != 1) {
		fprintf(stderr, "flood: bad address %s\n", ip);
		return 2;
	}
	t0 = now();
	do {
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		if (fd < 0) {
			perror("socket");
			return 1;
		}
		if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) ||
		    write(fd, buf, sizeof(buf)) != (ssize_t)sizeof(buf))
			errors++;
		else
			conns++;
		close(fd);
		t = now();
	} while (t - t0 < seconds);
	printf("sent %llu seconds %.6f errors %llu\n", conns, t - t0, errors);
	return 0;
}

static int do_spin(double seconds)
{
	volatile unsigned long long n = 0;
	double t0 = now();

	while (now() - t0 < seconds)
		for (int i = 0; i < 100000; i++)
			n++;
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "send"))
		return do_send(argv[2], atoi(argv[3]), atof(argv[4]),
			       argc > 5 ? (size_t)atoi(argv[5]) : 18);
	if (argc == 3 && !strcmp(argv[1], "sink"))
		return do_sink(atoi(argv[2]));
	if (argc >= 5 && !strcmp(argv[1], "tcp-send"))
		return do_tcp_send(argv[2], atoi(argv[3]), atof(argv[4]),
				   argc > 5 ? (size_t)atoi(argv[5]) : 64);
	if (argc == 3 && !strcmp(argv[1], "tcp-sink"))
		return do_tcp_sink(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "tcp-conns"))
		return do_tcp_conns(argv[2], atoi(argv[3]), atof(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "spin"))
		return do_spin(atof(argv[2]));
	fprintf(stderr, "usage: flood send|tcp-send DST_IP PORT SECONDS [BYTES] | "
			"flood sink|tcp-sink PORT | flood tcp-conns DST_IP PORT SECONDS | "
			"flood spin SECONDS\n");
	return 2;
}
