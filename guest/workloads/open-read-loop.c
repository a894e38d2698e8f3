/* open-read-loop N PATH...: open and read each PATH N times, print the bytes read per path and
 * an FNV-1a checksum of the contents so a test can check that the kernel still reads correctly. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n, i;
	int p, status = 0;
	char buf[4096];

	if (argc < 3) {
		fprintf(stderr, "usage: open-read-loop N PATH...\n");
		return 2;
	}
	n = strtol(argv[1], NULL, 0);
	for (p = 2; p < argc; p++) {
		uint64_t hash = 1469598103934665603ULL;
		long long total = 0;
		for (i = 0; i < n; i++) {
			int fd = open(argv[p], O_RDONLY);
			ssize_t r;
			if (fd < 0) {
				perror(argv[p]);
				status = 1;
				break;
			}
			while ((r = read(fd, buf, sizeof(buf))) > 0) {
				total += r;
				if (i == 0)
					for (ssize_t k = 0; k < r; k++)
						hash = (hash ^ (unsigned char)buf[k]) * 1099511628211ULL;
			}
			close(fd);
		}
		printf("open-read-loop: path=%s opens=%ld bytes=%lld fnv1a=%016llx\n", argv[p], i, total,
		       (unsigned long long)hash);
	}
	return status;
}
