"""The C allocator's handling of large CPU tensors: keep freed memory in the process instead of returning it.

glibc serves every allocation above 32 MiB from a fresh `mmap` and unmaps it on free, so each such tensor costs one
page fault per 4 KiB page every time it is created. A CPU training step of Any2Point makes many: the embedder's
per-neighbour tensors are (B, M, k, C), 75 MiB each in fp32 for B=32 and 1024 points. Measured on this project's
2-core CPU (MiniLM, B=32, bf16, compiled pooling and blocks): 177,000 page faults and 0.45 s of kernel time per
1.5 s training step with the defaults, almost none with freed memory kept, and the step took 0.91x as long (0.73x
with eager pooling and blocks; `benchmarks/bench_allocator.py`). Jemalloc or tcmalloc preloaded with `LD_PRELOAD`
do the same; this needs nothing installed.
"""

from __future__ import annotations

import ctypes
import platform


# mallopt parameters of glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc serve large allocations from its heap and keep freed memory for reuse, for the whole process.

    The process then holds on to its peak memory in exchange for no page faults: 1.6 GiB resident between MiniLM
    training steps at B=32, against 1.1-1.2 GiB with the defaults, and steady from step to step. There is no undoing it:
    glibc stops adapting its mmap threshold once it is set. Returns whether it took effect: False, and nothing
    changed, where the C library is not glibc (macOS, Windows, musl).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # mallopt returns 1 on success; both are set, whatever the first returned.
    took = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, _INT_MAX)]
    return all(result == 1 for result in took)
