/* exit-loop N: make exactly N guest accesses that KVM hands to the VMM's user space, then
 * print how many and how long the loop took (CLOCK_MONOTONIC, ns): the floor a VM exit costs,
 * which the exit-cost benchmark sets each probe plan's hit against. x86_64: a read of I/O port
 * 0x80 (no device claims it; needs ioperm). arm64: a read of a guest physical address no device
 * or memory backs (0x0a000000, between the UART and RAM), through /dev/mem. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <sys/io.h>
#endif

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 1000;
	long i;
	unsigned sum = 0;
	struct timespec t0, t1;

	if (n < 0) {
		fprintf(stderr, "exit-loop: count must be >= 0\n");
		return 2;
	}
#if defined(__x86_64__)
	if (ioperm(0x80, 1, 1)) {
		perror("exit-loop: ioperm");
		return 1;
	}
#define ACCESS() (sum += inb(0x80))
#elif defined(__aarch64__)
	int fd = open("/dev/mem", O_RDONLY | O_SYNC);
	if (fd < 0) {
		perror("exit-loop: /dev/mem");
		return 1;
	}
	volatile uint32_t *mmio = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0x0a000000);
	if (mmio == MAP_FAILED) {
		perror("exit-loop: mmap");
		return 1;
	}
#define ACCESS() (sum += *mmio)
#else
#error "exit-loop: no exit for this architecture"
#endif
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < n; i++)
		ACCESS();
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("exit-loop: accesses=%ld sum=%u ns=%lld\n", n, sum,
	       (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return 0;
}
