"""Keep freed host memory in the process, so that XLA's per-step CPU buffers do not page-fault.

On the CPU backend every execution of a compiled step allocates its temporary buffers and
outputs (tens to hundreds of MB for the AV-MNIST models) and frees them at the end. With glibc's
defaults, blocks that large are mmap-ed and unmapped each time, and every first touch of a page
is then a page fault that zero-fills it: on the 2-core VM of the benchmarks that was ~20 % of the
fast step's CPU time at batch 40 (12,500 page faults per step) and writing fresh memory ran at
~1 GB/s against ~10 GB/s for reused memory.

`retain_freed_memory()` sets glibc's malloc to serve those blocks from its heaps and to keep
freed memory for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB): after the first steps there are
(almost) no page faults. The process keeps its peak memory instead of returning it to the OS,
which is what a training process wants. (Also forcing a single arena, M_ARENA_MAX=1, removed the
last faults but made XLA's multi-threaded compilation 60 % slower and the step 10 % slower from
lock contention, so it is not set.) Best called before JAX starts (the benchmark does it first
thing). A no-op returning False off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 1 << 30

_applied = False


def retain_freed_memory() -> bool:
  """Configures glibc malloc to keep and reuse freed memory (module docstring). Returns whether
  it was applied (True also on repeated calls); False where the C library is not glibc."""
  global _applied
  if _applied:
    return True
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES)))
  _applied = ok
  return ok
