/* bad-pointer-loop N: N times, pass bad user pointers through the kernel's user-copy paths
 * (read and write into an unmapped page and a kernel address, open and stat of NULL and of an
 * unmapped name, getcwd into an unmapped page) and one good read, and check that every bad
 * call fails with EFAULT and the good one reads the file. Prints one line with the counts; the
 * exit status is 0 only if every call behaved. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static long efault, wrong;

static void expect_efault(long r, const char *what)
{
	if (r == -1 && errno == EFAULT) {
		efault++;
	} else {
		wrong++;
		fprintf(stderr, "bad-pointer-loop: %s: returned %ld errno %d, not EFAULT\n", what, r,
			errno);
	}
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 1, i, good = 0;
	void *unmapped = (void *)1;
	void *kernel = (void *)0xffffffff81000000UL;
	char buf[64];
	struct stat st;
	int pipefd[2];

	if (pipe(pipefd) != 0) {
		perror("pipe");
		return 2;
	}
	for (i = 0; i < n; i++) {
		int fd = open("/etc/passwd", O_RDONLY);
		if (fd < 0) {
			perror("/etc/passwd");
			return 2;
		}
		expect_efault(syscall(SYS_read, fd, unmapped, 16), "read into an unmapped page");
		expect_efault(syscall(SYS_read, fd, kernel, 16), "read into a kernel address");
		expect_efault(syscall(SYS_write, pipefd[1], unmapped, 16), "write from an unmapped page");
#ifdef SYS_open
		expect_efault(syscall(SYS_open, NULL, O_RDONLY), "open(NULL)");
#else /* arm64's generic syscall table has only openat and newfstatat */
		expect_efault(syscall(SYS_openat, AT_FDCWD, NULL, O_RDONLY), "open(NULL)");
#endif
		expect_efault(syscall(SYS_openat, AT_FDCWD, unmapped, O_RDONLY), "open of an unmapped name");
#ifdef SYS_stat
		expect_efault(syscall(SYS_stat, NULL, &st), "stat(NULL)");
		expect_efault(syscall(SYS_stat, "/etc/passwd", unmapped), "stat into an unmapped page");
#else
		expect_efault(syscall(SYS_newfstatat, AT_FDCWD, NULL, &st, 0), "stat(NULL)");
		expect_efault(syscall(SYS_newfstatat, AT_FDCWD, "/etc/passwd", unmapped, 0),
			      "stat into an unmapped page");
#endif
		expect_efault(syscall(SYS_getcwd, unmapped, 64), "getcwd into an unmapped page");
		if (lseek(fd, 0, SEEK_SET) == 0 && read(fd, buf, 5) == 5 && memcmp(buf, "root:", 5) == 0)
			good++;
		else
			wrong++;
		close(fd);
	}
	printf("bad-pointer-loop: runs=%ld efault=%ld good=%ld wrong=%ld\n", n, efault, good, wrong);
	return wrong == 0 ? 0 : 1;
}
