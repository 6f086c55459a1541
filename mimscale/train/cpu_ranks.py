"""Process settings for ranks that train on the CPU (DeepSpeed's CPU accelerator: tests, the demo, CPU
smoke runs). GPU ranks are left alone.

Two things make a CPU rank slow by default, both measured with ``benchmarks/train_step.py``:

* **Threads.** Every rank on a host defaults to all its cores; with two ranks on two cores ZeRO-3 ran
  20x slower. Each rank gets its share of the cores unless ``OMP_NUM_THREADS`` says otherwise.
* **Page faults on per-step buffers.** DeepSpeed ZeRO-1/2 allocates its gradient buckets and flat
  partitions anew every step (hundreds of MB for a ViT-B). glibc serves blocks above 32 MB with
  ``mmap`` and unmaps them on free, so each step touches every page of them afresh: on a 2-core VM this
  doubled the DeepSpeed engine's step time (HF's MAE in the same engine: 2.15 s vs 1.30 s per step).
  On GPUs PyTorch's caching allocator keeps such buffers; on the CPU we ask glibc to do the same:
  serve large blocks from the heap (``M_MMAP_MAX = 0``) and never trim it (``M_TRIM_THRESHOLD``),
  the retention a caching allocator (or jemalloc/tcmalloc, commonly preloaded for CPU training) gives.
  The cost: memory a rank has freed is kept for its later allocations instead of returned to the OS.
* **Denormal floats.** GELU's ``exp(-x^2/2)`` underflows to denormals for large activations, and x86
  cores take a slow path on them (MAE's decoder GELU ran ~3x slower than on normal inputs). Flushing
  denormals to zero (``torch.set_flush_denormal``, FTZ/DAZ) changes values below ~1e-38 only; GPUs
  flush them in their fast paths anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def share_cores() -> int:
    """Give this rank ``cores // ranks on this host`` threads unless OMP_NUM_THREADS is set; returns them."""
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.get_num_threads()


def retain_freed_memory() -> bool:
    """glibc only: keep freed large blocks in the heap for reuse (no mmap, no trim); True if it applied.

    Skipped with ``MIMSCALE_CPU_MALLOC=default`` or where the C library has no ``mallopt`` (musl, macOS).
    """
    if os.environ.get("MIMSCALE_CPU_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A trim threshold of -1 reads as SIZE_MAX in glibc: never trim (DeepSpeed's bucket buffers exceed
    # any positive int threshold).
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def flush_denormals() -> bool:
    """FTZ/DAZ for this process's CPU math (False where the CPU has no such mode)."""
    return bool(torch.set_flush_denormal(True))


def configure_cpu_rank() -> str:
    """The settings above; returns a one-line description for the run's log."""
    threads = share_cores()
    retained = retain_freed_memory()
    ftz = flush_denormals()
    return (
        f"CPU rank: {threads} threads, malloc {'retains freed blocks' if retained else 'default'}, "
        f"denormals {'flushed' if ftz else 'kept'}"
    )
