/*
 * Heartbeat workload of the pycriu benchmark (compiled by the harness, see bench/heartbeat.py).
 *
 *   workload --hb FILE --mib N [--rate FRACTION] [--interval-us 1000] [--ring 65536]
 *
 * 1. Maps N MiB of private anonymous memory and fills every 4 KiB page with a known pattern:
 *    word 0 is the page's generation, word 1 its index, and word i (i >= 2) is
 *    pattern(index, generation, i). Every page is therefore self-describing, and a verification
 *    (SIGUSR1) checks all of them without any other state.
 * 2. Creates FILE and sets its size once, before the first beat: a 4 KiB header and a ring of
 *    RING records of 32 bytes. The size never changes afterwards (CRIU checks the size of the
 *    regular files a task holds open when it restores them).
 * 3. About every INTERVAL microseconds (absolute CLOCK_MONOTONIC deadlines, no catch-up burst
 *    after a stall) it writes one record {seq, CLOCK_REALTIME ns, CLOCK_MONOTONIC ns, 0} at slot
 *    seq % RING, then the beat count in the header. The harness measures with CLOCK_REALTIME:
 *    CRIU restores a tree that has its own PID namespace into a new *time* namespace whose
 *    CLOCK_MONOTONIC is shifted back by the downtime (restore.log: "timens: monotonic -1 ..."),
 *    so the restored task's monotonic clock hides the gap; CLOCK_REALTIME is not namespaced and
 *    is one clock for every process of the machine. The monotonic stamp shows that shift.
 * 4. With --rate F it rewrites about F * N MiB per second, page after page, each page with its
 *    next generation (so it dirties memory at that rate and stays verifiable).
 *
 * The harness runs it as `unshare --pid --fork setsid workload ...` with stdio on /dev/null.
 * On SIGUSR1 it verifies every page and stores the number of bad pages in the header.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define HEADER 4096UL
#define RECORD 32UL
#define MAGIC 0x3130304248424350ULL /* "PCBHB001" little-endian */

/* Header layout: u64 fields at these byte offsets (the harness reads the same layout). */
enum {
	H_MAGIC = 0,
	H_VERSION = 8,
	H_RING = 16,
	H_INTERVAL_NS = 24,
	H_MIB = 32,
	H_RATE_PPM = 40,
	H_SEQ = 48,           /* beats written so far; the newest record is seq - 1 */
	H_FILL_NS = 56,       /* how long the initial fill took */
	H_VERIFY_COUNT = 64,  /* verifications done */
	H_VERIFY_BAD = 72,    /* bad pages found by the last verification */
	H_PAGES_WRITTEN = 80, /* pages rewritten by the write rate so far */
};

static volatile sig_atomic_t want_verify;

static void on_usr1(int sig)
{
	(void)sig;
	want_verify = 1;
}

static uint64_t clock_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void)
{
	return clock_ns(CLOCK_MONOTONIC);
}

static inline uint64_t pattern(uint64_t index, uint64_t gen, uint64_t i)
{
	uint64_t x = (index << 20) ^ (gen << 44) ^ i;
	x ^= x >> 31;
	x *= 0x9E3779B97F4A7C15ULL;
	return x ^ (x >> 29);
}

static void write_page(uint64_t *page, uint64_t index, uint64_t gen)
{
	page[0] = gen;
	page[1] = index;
	for (uint64_t i = 2; i < WORDS; i++)
		page[i] = pattern(index, gen, i);
}

static uint64_t verify(const unsigned char *mem, uint64_t npages)
{
	uint64_t bad = 0;
	for (uint64_t p = 0; p < npages; p++) {
		const uint64_t *page = (const uint64_t *)(mem + p * PAGE);
		int ok = page[1] == p;
		for (uint64_t i = 2; ok && i < WORDS; i++)
			ok = page[i] == pattern(p, page[0], i);
		bad += !ok;
	}
	return bad;
}

static void put(int fd, off_t off, uint64_t value)
{
	if (pwrite(fd, &value, sizeof(value), off) != sizeof(value))
		_exit(3);
}

static void usage(void)
{
	fprintf(stderr, "usage: workload --hb FILE --mib N [--rate F] [--interval-us US] [--ring K]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *hb = NULL;
	uint64_t mib = 0, ring = 65536, interval_ns = 1000000;
	double rate = 0.0;

	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--hb"))
			hb = argv[++i];
		else if (!strcmp(argv[i], "--mib"))
			mib = strtoull(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "--rate"))
			rate = strtod(argv[++i], NULL);
		else if (!strcmp(argv[i], "--interval-us"))
			interval_ns = strtoull(argv[++i], NULL, 10) * 1000;
		else if (!strcmp(argv[i], "--ring"))
			ring = strtoull(argv[++i], NULL, 10);
		else
			usage();
	}
	if (!hb || !mib || !ring || !interval_ns || rate < 0)
		usage();

	signal(SIGUSR1, on_usr1);

	uint64_t npages = mib * (1UL << 20) / PAGE;
	unsigned char *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	uint64_t t_fill = now_ns();
	for (uint64_t p = 0; p < npages; p++)
		write_page((uint64_t *)(mem + p * PAGE), p, 0);
	t_fill = now_ns() - t_fill;

	int fd = open(hb, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		perror("open");
		return 1;
	}
	if (ftruncate(fd, HEADER + ring * RECORD)) {
		perror("ftruncate");
		return 1;
	}
	put(fd, H_VERSION, 1);
	put(fd, H_RING, ring);
	put(fd, H_INTERVAL_NS, interval_ns);
	put(fd, H_MIB, mib);
	put(fd, H_RATE_PPM, (uint64_t)(rate * 1e6));
	put(fd, H_SEQ, 0);
	put(fd, H_FILL_NS, t_fill);
	put(fd, H_MAGIC, MAGIC); /* last: the header is complete once the magic is there */

	/* Pages to rewrite per beat, as a fixed-point credit so that small rates work too. */
	double pages_per_beat = rate * (double)npages * (double)interval_ns / 1e9;
	double credit = 0.0;
	uint64_t cursor = 0, written = 0, seq = 0, verifications = 0;
	uint64_t next = now_ns() + interval_ns;

	for (;;) {
		struct timespec ts = {.tv_sec = next / 1000000000ULL, .tv_nsec = next % 1000000000ULL};
		int err = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
		if (err && err != EINTR)
			return 4;

		uint64_t t = now_ns();
		uint64_t rec[4] = {seq, clock_ns(CLOCK_REALTIME), t, 0};
		if (pwrite(fd, rec, sizeof(rec), HEADER + (seq % ring) * RECORD) != sizeof(rec))
			return 3;
		put(fd, H_SEQ, ++seq);

		if (pages_per_beat > 0) {
			credit += pages_per_beat;
			while (credit >= 1.0) {
				uint64_t *page = (uint64_t *)(mem + cursor * PAGE);
				write_page(page, cursor, page[0] + 1);
				cursor = (cursor + 1) % npages;
				credit -= 1.0;
				written++;
			}
			put(fd, H_PAGES_WRITTEN, written);
		}
		if (want_verify) {
			want_verify = 0;
			put(fd, H_VERIFY_BAD, verify(mem, npages));
			put(fd, H_VERIFY_COUNT, ++verifications);
		}

		next += interval_ns;
		t = now_ns();
		if (next <= t) /* stalled (frozen, migrated, descheduled): no burst of beats */
			next = t + interval_ns;
	}
}
