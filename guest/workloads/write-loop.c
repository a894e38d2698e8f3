/* write-loop N PATH STRING: write STRING to PATH N times (open, write, close) and print the
 * bytes written and the time taken (CLOCK_MONOTONIC, ns=): the cost of writes into a kernel
 * variable through a sysctl, with and without hvprobe watching it. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n, i;
	long long bytes = 0;
	struct timespec t0, t1;

	if (argc != 4) {
		fprintf(stderr, "usage: write-loop N PATH STRING\n");
		return 2;
	}
	n = strtol(argv[1], NULL, 0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < n; i++) {
		int fd = open(argv[2], O_WRONLY);
		ssize_t w;
		if (fd < 0) {
			perror(argv[2]);
			return 1;
		}
		w = write(fd, argv[3], strlen(argv[3]));
		if (w < 0) {
			perror("write");
			return 1;
		}
		bytes += w;
		close(fd);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("write-loop: writes=%ld bytes=%lld ns=%lld\n", n, bytes,
	       (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return 0;
}
