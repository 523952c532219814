"""Types of the compiled hot loops (pycriu/images/_scan.pyx)."""

import mmap

Buffer = bytes | bytearray | memoryview | mmap.mmap

def find_all(data: Buffer, start: int, end: int, needle: Buffer, hits: list[int], limit: int) -> int: ...
def changed_pages(a: Buffer, a_off: int, b: Buffer, b_off: int, npages: int, page_size: int,
                  marks: bytearray | None = ...) -> int: ...
