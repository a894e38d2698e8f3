/* getpid-loop N: issue the getpid system call exactly N times (raw syscall, no libc caching),
 * then print how many calls were made. Drives __x64_sys_getpid for probe tests. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 1000;
	long pid = 0, i;

	if (n < 0) {
		fprintf(stderr, "getpid-loop: count must be >= 0\n");
		return 2;
	}
	for (i = 0; i < n; i++)
		pid = syscall(SYS_getpid);
	printf("getpid-loop: calls=%ld pid=%ld\n", n, pid);
	return 0;
}
