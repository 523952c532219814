# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The hot loops of reading memory from checkpoint images: finding a byte string in page data,
and comparing two checkpoints' pages. Both work on buffers (memory maps of ``pages-*.img``),
never on copies, and release the GIL while they scan.

:mod:`pycriu.images.memory` decides *where* to look (which bytes of which page file hold which
virtual addresses); this module only scans the bytes it is given.
"""

from libc.string cimport memchr, memcmp
from libc.stdint cimport uint8_t

cdef extern from "string.h" nogil:
    # glibc's memmem (a GNU extension; string.h declares it under _GNU_SOURCE, as Python's
    # own headers define it)
    void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen)

# How often a byte value turns up in process memory, roughly: zeros by far the most, then small
# integers, 0xff and ASCII letters. The byte of the needle with the lowest rank is the anchor
# memchr looks for, so that the scan runs at memchr's speed and few candidates need checking.
cdef int _rank(uint8_t b) noexcept nogil:
    if b == 0:
        return 1000
    if b == 0xff:
        return 400
    if b < 0x10:
        return 300
    if b == 0x20 or (b >= 0x61 and b <= 0x7a):  # space, a-z
        return 120
    if (b >= 0x30 and b <= 0x39) or (b >= 0x41 and b <= 0x5a):  # 0-9, A-Z
        return 80
    if b >= 0x80:
        return 40
    return 60


#: After this many candidates that did not match, the anchor byte is common in this data: the
#: rest of the buffer is scanned with memmem instead.
cdef enum:
    _MISS_LIMIT = 4096


cdef Py_ssize_t _find(const uint8_t *hay, Py_ssize_t n, const uint8_t *needle, Py_ssize_t m,
                      Py_ssize_t anchor, Py_ssize_t *misses) noexcept nogil:
    """Offset of the first occurrence of needle in hay[0:n], or -1."""
    cdef const uint8_t *p
    cdef const uint8_t *q
    cdef const uint8_t *end
    cdef uint8_t a
    if m > n:
        return -1
    if misses[0] >= _MISS_LIMIT:
        q = <const uint8_t *>memmem(hay, n, needle, m)
        return -1 if q == NULL else q - hay
    a = needle[anchor]
    # candidates: positions p of the anchor byte with room for the whole needle around it
    p = hay + anchor
    end = hay + n - (m - anchor - 1)
    while p < end:
        p = <const uint8_t *>memchr(p, a, end - p)
        if p == NULL:
            return -1
        q = p - anchor
        if memcmp(q, needle, m) == 0:
            return q - hay
        misses[0] += 1
        if misses[0] >= _MISS_LIMIT:
            q = <const uint8_t *>memmem(q + 1, n - (q + 1 - hay), needle, m)
            return -1 if q == NULL else q - hay
        p += 1
    return -1


cdef Py_ssize_t _anchor(const uint8_t *needle, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i, best = 0
    for i in range(1, m):
        if _rank(needle[i]) < _rank(needle[best]):
            best = i
    return best


def find_all(const uint8_t[::1] data, Py_ssize_t start, Py_ssize_t end, const uint8_t[::1] needle,
             list hits, Py_ssize_t limit):
    """Count the occurrences of ``needle`` in ``data[start:end]`` (overlapping ones too, as a
    scan that moves one byte past each hit finds them); append the offsets (from ``start``) of
    the first ``limit`` to ``hits``. Returns the count."""
    cdef Py_ssize_t m = needle.shape[0]
    cdef Py_ssize_t count = 0, pos = 0, n, found, anchor, misses = 0
    cdef const uint8_t *hay
    if m == 0:
        raise ValueError("the needle is empty")
    if start < 0 or end > data.shape[0] or start > end:
        raise ValueError(f"range {start}:{end} is outside a buffer of {data.shape[0]} bytes")
    n = end - start
    if n < m:
        return 0
    hay = &data[start]
    anchor = _anchor(&needle[0], m)
    while True:
        with nogil:
            found = _find(hay + pos, n - pos, &needle[0], m, anchor, &misses)
        if found < 0:
            return count
        if count < limit:
            hits.append(pos + found)
        count += 1
        pos += found + 1
        if n - pos < m:
            return count


def changed_pages(const uint8_t[::1] a, Py_ssize_t a_off, const uint8_t[::1] b, Py_ssize_t b_off,
                  Py_ssize_t npages, Py_ssize_t page_size, bytearray marks=None):
    """How many of ``npages`` pages differ between ``a[a_off:]`` and ``b[b_off:]``; with
    ``marks`` (a bytearray of ``npages``), page i's mark is set to 1 where it differs."""
    cdef Py_ssize_t i, changed = 0
    cdef const uint8_t *pa
    cdef const uint8_t *pb
    cdef uint8_t *mk = NULL
    if npages < 0 or page_size <= 0:
        raise ValueError("npages must be >= 0 and page_size > 0")
    if a_off < 0 or b_off < 0 or a_off + npages * page_size > a.shape[0] or b_off + npages * page_size > b.shape[0]:
        raise ValueError("the pages to compare lie outside the buffers")
    if marks is not None:
        if len(marks) < npages:
            raise ValueError("marks is shorter than npages")
        mk = <uint8_t *>(<char *>marks)
    if npages == 0:
        return 0
    pa = &a[a_off]
    pb = &b[b_off]
    with nogil:
        for i in range(npages):
            if memcmp(pa + i * page_size, pb + i * page_size, page_size) != 0:
                changed += 1
                if mk != NULL:
                    mk[i] = 1
    return changed
