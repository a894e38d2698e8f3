/* getpid-loop N: issue the getpid system call exactly N times (raw syscall, no libc caching),
 * then print how many calls were made and how long the loop took (CLOCK_MONOTONIC, ns: what
 * the probe benchmarks time). Drives __x64_sys_getpid for probe tests. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 1000;
	long pid = 0, i;
	struct timespec t0, t1;

	if (n < 0) {
		fprintf(stderr, "getpid-loop: count must be >= 0\n");
		return 2;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < n; i++)
		pid = syscall(SYS_getpid);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("getpid-loop: calls=%ld pid=%ld ns=%lld\n", n, pid,
	       (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return 0;
}
