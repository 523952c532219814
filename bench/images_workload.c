/*
 * Workload of the checkpoint-inspection benchmark (bench/images.py, which compiles it).
 *
 *   images_workload --mib N [--procs P] [--rewrite K] [--marker-every M]
 *
 * 1. The root forks P - 1 children first (so no page is shared copy-on-write), then each of the
 *    P processes maps N / P MiB of private anonymous memory and fills every 4 KiB page with the
 *    pattern of bench/workload.c: word 0 the page's generation, word 1 its index, word 2 the
 *    process's number (0 for the root), word i >= 3 pattern(index, generation, owner, i).
 * 2. Every M-th page (index % M == 0; default 256) holds MARKER (24 bytes) at byte 24: the
 *    needle a search must find, N / P * 256 / M times per process. Rewrites keep it.
 * 3. Each process then creates "ready-OWNER" in its working directory and waits for signals.
 * 4. On SIGUSR1 a process rewrites the next K pages of its memory (cursor wrapping round; K = 0:
 *    nothing) with their next generation, so exactly K of its pages change, then writes the
 *    number of rewrites done so far into "done-OWNER" (a new file renamed in place; no file is
 *    held open, nothing else is written).
 *
 * The harness runs it as `unshare --pid --fork setsid images_workload ...` and signals every
 * process of the tree itself.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define MARKER "pycriu-bench-marker-0001"
#define MARKER_OFFSET 24

static volatile sig_atomic_t pending;

static void on_usr1(int sig)
{
	(void)sig;
	pending++;
}

static inline uint64_t pattern(uint64_t index, uint64_t gen, uint64_t owner, uint64_t i)
{
	uint64_t x = (index << 20) ^ (gen << 44) ^ (owner << 56) ^ i;
	x ^= x >> 31;
	x *= 0x9E3779B97F4A7C15ULL;
	return x ^ (x >> 29);
}

static void write_page(uint64_t *page, uint64_t index, uint64_t gen, uint64_t owner, uint64_t every)
{
	page[0] = gen;
	page[1] = index;
	page[2] = owner;
	for (uint64_t i = 3; i < WORDS; i++)
		page[i] = pattern(index, gen, owner, i);
	if (every && index % every == 0)
		memcpy((char *)page + MARKER_OFFSET, MARKER, sizeof(MARKER) - 1);
}

static void mark(const char *what, uint64_t owner, uint64_t value)
{
	char path[64], tmp[72];
	snprintf(path, sizeof(path), "%s-%lu", what, (unsigned long)owner);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f || fprintf(f, "%lu\n", (unsigned long)value) < 0 || fclose(f) || rename(tmp, path))
		_exit(3);
}

static void usage(void)
{
	fprintf(stderr, "usage: images_workload --mib N [--procs P] [--rewrite K] [--marker-every M]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	uint64_t mib = 0, procs = 2, rewrite = 0, every = 256;

	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--mib"))
			mib = strtoull(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "--procs"))
			procs = strtoull(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "--rewrite"))
			rewrite = strtoull(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "--marker-every"))
			every = strtoull(argv[++i], NULL, 10);
		else
			usage();
	}
	if (!mib || !procs || mib * (1UL << 20) / PAGE < procs)
		usage();

	sigset_t usr1, old;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, &old); /* delivered only inside sigsuspend */
	signal(SIGUSR1, on_usr1);

	uint64_t owner = 0;
	for (uint64_t k = 1; k < procs; k++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			owner = k;
			break;
		}
	}

	uint64_t npages = mib * (1UL << 20) / PAGE / procs;
	/* A guard page on each side keeps the data a mapping of its own: Linux 6.1 merged it with an
	   adjacent rw mapping, whose writes then counted as the data's in the diff. */
	unsigned char *area = mmap(NULL, (npages + 2) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	unsigned char *mem = area + PAGE;
	if (mprotect(mem, npages * PAGE, PROT_READ | PROT_WRITE)) {
		perror("mprotect");
		return 1;
	}
	for (uint64_t p = 0; p < npages; p++)
		write_page((uint64_t *)(mem + p * PAGE), p, 0, owner, every);
	mark("ready", owner, npages);

	uint64_t cursor = 0, rounds = 0;
	sigset_t wait = old;
	sigdelset(&wait, SIGUSR1);
	for (;;) {
		while (!pending)
			sigsuspend(&wait);
		pending--;
		for (uint64_t n = 0; n < rewrite && n < npages; n++) {
			uint64_t *page = (uint64_t *)(mem + cursor * PAGE);
			write_page(page, cursor, page[0] + 1, owner, every);
			cursor = (cursor + 1) % npages;
		}
		mark("done", owner, ++rounds);
	}
}
