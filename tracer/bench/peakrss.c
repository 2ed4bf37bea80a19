// SPDX-License-Identifier: Apache-2.0
/*
 * peakrss.c - run a command, print its peak resident set size (compiled at bench time).
 *
 *   peakrss CMD [ARG...]   ->  stderr: "peakrss KIB STATUS" as the last line
 *
 * Like GNU time's %M, from wait4(2). A command spawned straight from the bench
 * would report the bench's own size instead: Linux keeps the larger of a
 * process's peaks across exec, and a fork starts at its parent's size. This
 * small process keeps that floor small.
 */
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct rusage ru;
	int status = 0;
	pid_t pid;

	if (argc < 2) {
		fprintf(stderr, "usage: peakrss CMD [ARG...]\n");
		return 2;
	}
	pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		execvp(argv[1], argv + 1);
		perror("exec");
		_exit(127);
	}
	if (wait4(pid, &status, 0, &ru) < 0) {
		perror("wait4");
		return 1;
	}
	fprintf(stderr, "peakrss %ld %d\n", ru.ru_maxrss,
		WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
