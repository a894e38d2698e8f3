/* debug-loop: the guest's own debugging facilities, for the tests that check hvprobe leaves
 * them working.
 *   debug-loop offset    print the file offset of tick() in this executable (for a uprobe:
 *                        `p:u/tick /bin/debug-loop:OFFSET`)
 *   debug-loop calls N   call tick() N times; print the sum of its results, which the caller
 *                        checks (a uprobe that changed a register would change it)
 *   debug-loop watch N   set a hardware write watchpoint on a variable with perf_event_open,
 *                        write the variable N times, print how many events the kernel counted
 */
#include <linux/hw_breakpoint.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline)) long tick(long x)
{
	/* Several instructions, a multiply and a compare, so that a changed flag or register
	 * shows in the sum. */
	long y = x * 3 + 1;
	if (y & 4)
		y ^= 0x55;
	return y;
}

static volatile long watched;

static int offset(void)
{
	uintptr_t at = (uintptr_t)&tick;
	FILE *maps = fopen("/proc/self/maps", "r");
	char line[512];

	if (!maps) {
		perror("debug-loop: /proc/self/maps");
		return 1;
	}
	while (fgets(line, sizeof line, maps)) {
		unsigned long start, end, off;
		if (sscanf(line, "%lx-%lx %*s %lx", &start, &end, &off) == 3 && at >= start &&
		    at < end) {
			printf("%#lx\n", (unsigned long)(at - start + off));
			fclose(maps);
			return 0;
		}
	}
	fclose(maps);
	fprintf(stderr, "debug-loop: tick not in /proc/self/maps\n");
	return 1;
}

static int calls(long n)
{
	long sum = 0, i;

	for (i = 0; i < n; i++)
		sum += tick(i);
	printf("debug-loop: calls=%ld sum=%ld\n", n, sum);
	return 0;
}

static int watch(long n)
{
	struct perf_event_attr attr;
	long long count = 0;
	long i;
	int fd;

	memset(&attr, 0, sizeof attr);
	attr.type = PERF_TYPE_BREAKPOINT;
	attr.size = sizeof attr;
	attr.bp_type = HW_BREAKPOINT_W;
	attr.bp_addr = (uintptr_t)&watched;
	attr.bp_len = HW_BREAKPOINT_LEN_8;
	attr.exclude_kernel = 1;
	attr.exclude_hv = 1;
	fd = syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0);
	if (fd < 0) {
		perror("debug-loop: perf_event_open");
		return 1;
	}
	for (i = 0; i < n; i++)
		watched = i;
	if (read(fd, &count, sizeof count) != sizeof count) {
		perror("debug-loop: read");
		return 1;
	}
	printf("debug-loop: writes=%ld events=%lld\n", n, count);
	return 0;
}

int main(int argc, char **argv)
{
	long n = argc > 2 ? strtol(argv[2], NULL, 0) : 100;

	if (argc > 1 && !strcmp(argv[1], "offset"))
		return offset();
	if (argc > 1 && !strcmp(argv[1], "calls"))
		return calls(n);
	if (argc > 1 && !strcmp(argv[1], "watch"))
		return watch(n);
	fprintf(stderr, "usage: debug-loop offset | calls N | watch N\n");
	return 2;
}
