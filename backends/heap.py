"""The process heap: glibc told to keep freed memory, for the CPU backends (and the PyTorch peers).

A training step allocates and frees the same ~1-2 GB of activations and gradients every step (on
gpt2-small). By default glibc serves every block above 32 MB, and many smaller ones, with a fresh
mmap and unmaps it on free, so each step pays again for page faults, the kernel zeroing every page
and assembling transparent huge pages: measured 20k-130k faults and 0.5-3 s of system time per
gpt2-small step on 2 cores, on numpy and torch tensors alike. With mmap off and heap trimming off,
freed blocks go back to malloc's free lists and the next step reuses them: no faults, no system
time after the first step. The cost is that the process keeps its peak heap. It is the effect of
PyTorch's CPU tuning advice (a caching allocator such as jemalloc or tcmalloc), without a library.
"""
import ctypes
import platform


def keep_freed_memory() -> None:
    """Process-wide and glibc-only (elsewhere a no-op); idempotent. The environment's own
    MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ do the same before a process starts."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                  # <malloc.h>
    libc = ctypes.CDLL(None)
    libc.mallopt(M_TRIM_THRESHOLD, -1)                     # never trim the heap (-1 = SIZE_MAX)
    libc.mallopt(M_MMAP_MAX, 0)                            # serve big blocks from the heap too
