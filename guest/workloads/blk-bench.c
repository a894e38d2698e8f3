/* blk-bench DEV read|write seq|rand BS COUNT: COUNT direct (O_DIRECT) reads or writes of BS
 * bytes on the block device DEV, in order from its start or at random BS-aligned offsets
 * (xorshift, fixed seed), writes followed by one fdatasync; prints the bytes moved, the time
 * taken (CLOCK_MONOTONIC, ns=) and the rate, so a benchmark can compare disk back ends. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

int main(int argc, char **argv)
{
	int write_mode, random_mode, fd;
	long bs, count, i;
	uint64_t size, blocks, x = 0x9e3779b97f4a7c15ULL;
	void *buf;
	struct timespec t0, t1;
	long long ns;

	if (argc != 6) {
		fprintf(stderr, "usage: blk-bench DEV read|write seq|rand BS COUNT\n");
		return 2;
	}
	write_mode = strcmp(argv[2], "write") == 0;
	random_mode = strcmp(argv[3], "rand") == 0;
	bs = strtol(argv[4], NULL, 0);
	count = strtol(argv[5], NULL, 0);
	fd = open(argv[1], (write_mode ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) != 0) {
		perror(argv[1]);
		return 1;
	}
	blocks = size / bs;
	if (bs <= 0 || blocks == 0 || (!random_mode && (uint64_t)count > blocks)) {
		fprintf(stderr, "blk-bench: %s holds %llu blocks of %ld bytes\n", argv[1],
			(unsigned long long)blocks, bs);
		return 2;
	}
	if (posix_memalign(&buf, 4096, bs) != 0)
		return 1;
	memset(buf, 0x5a, bs);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < count; i++) {
		uint64_t block = i;
		ssize_t n;
		if (random_mode) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			block = x % blocks;
		}
		if (write_mode)
			n = pwrite(fd, buf, bs, (off_t)(block * bs));
		else
			n = pread(fd, buf, bs, (off_t)(block * bs));
		if (n != bs) {
			perror(write_mode ? "pwrite" : "pread");
			return 1;
		}
	}
	if (write_mode && fdatasync(fd) != 0) {
		perror("fdatasync");
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	ns = (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
	printf("blk-bench: %s %s bs=%ld ops=%ld bytes=%lld ns=%lld MBps=%.1f iops=%.0f\n", argv[2],
	       argv[3], bs, count, (long long)bs * count, ns, (double)bs * count * 1e3 / ns,
	       (double)count * 1e9 / ns);
	return 0;
}
