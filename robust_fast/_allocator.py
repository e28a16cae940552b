"""The CPU allocator setting `robust-fast` applies to itself (train, eval, demo).

glibc serves an allocation above its mmap threshold (32 MiB at most, adjusted as the program
runs) with a fresh mmap and returns it to the system on free; the next tensor of that size
then page-faults on every page it touches. One convolution of a (128, 32, 28, 28) batch with a
51 MB output took 190 ms with 15,666 minor faults per call, 98 ms with none once the memory was
kept (1 thread, this project's 2-core VM). Raising the mmap threshold and the trim threshold
keeps freed memory in the process for the next tensor; the cost is that the process's resident
memory stays at its peak. Set ROBUST_FAST_CPU_ALLOCATOR=system to leave glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Dict

ENV = "ROBUST_FAST_CPU_ALLOCATOR"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30                      # allocations below 1 GiB come from the heap
TRIM_THRESHOLD = 1 << 30                      # the heap's top is given back above 1 GiB free


def tune_cpu_allocator() -> Dict[str, object]:
    """Raises glibc's mmap and trim thresholds (mallopt) unless ROBUST_FAST_CPU_ALLOCATOR=system.
    Returns {"applied": bool, "reason": str}; anything but glibc on Linux is left alone."""
    if os.environ.get(ENV, "").lower() == "system":
        return {"applied": False, "reason": f"{ENV}=system"}
    if not sys.platform.startswith("linux"):
        return {"applied": False, "reason": f"not Linux ({sys.platform})"}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as error:
        return {"applied": False, "reason": f"no glibc mallopt ({error})"}
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return {"applied": ok, "reason": "mallopt: mmap and trim thresholds 1 GiB" if ok else "mallopt refused"}
