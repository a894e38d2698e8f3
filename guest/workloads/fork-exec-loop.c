/* fork-exec-loop N [PROG [ARGS...]]: fork and exec PROG (default /bin/true) N times, wait for
 * each child and print how many exited with status 0 and the time taken (CLOCK_MONOTONIC, ns=).
 * Drives the process-creation paths. */
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 10;
	char *deflt[] = { "/bin/true", NULL };
	char **child = argc > 2 ? &argv[2] : deflt;
	long i, ok = 0;
	struct timespec t0, t1;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < n; i++) {
		pid_t pid = fork();
		int st;
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			execv(child[0], child);
			perror(child[0]);
			_exit(127);
		}
		if (waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0)
			ok++;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("fork-exec-loop: runs=%ld ok=%ld ns=%lld\n", n, ok,
	       (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return ok == n ? 0 : 1;
}
