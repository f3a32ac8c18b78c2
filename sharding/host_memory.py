"""On CPU, glibc's malloc keeps the memory a training step frees for the next step, instead of handing it
back to the kernel and faulting it in again.

Why: XLA:CPU allocates a step's temporaries as one buffer (547 MB for nanoGPT's 6-layer, 384-wide shape at
batch 8 per device) from a worker thread, which glibc serves from that thread's arena; a block that large
is mmap'd, and unmapped when freed, so every step touched 547 MB of fresh pages that the kernel zero-filled:
133,680 page faults and ~0.5 s of system time in a ~3.8 s step. With one arena, no mmap'd blocks and no
trimming the buffer is reused: 0 faults, and the step took 3.3-3.4 s instead of 3.8-4.2 (docs/benchmarks.md,
issue 16). PyTorch's CPU guides get the same effect by preloading jemalloc or tcmalloc; glibc's own
`mallopt` needs nothing installed. The arena limit only reaches threads that have not allocated yet, so
this runs before JAX's backends start.

What it does not prevent: fragmentation. Small blocks allocated between steps sometimes land in a freed
temporary, which then no longer fits the next one; glibc grows the heap by a temporary's size and faults
that in. A 64 MiB temporary, 20 fresh processes, 50 steps each: such growth on 0-4 of steps 20-49, the heap
at 186-914 MB after step 50 (tests/test_host_memory.py; events were still seen near step 250 of 400).
"""

from __future__ import annotations

import ctypes
import glob

import jax

# glibc's malloc.h parameters
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_FREED_MEMORY = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
# Device files of NVIDIA GPUs, AMD GPUs (ROCm) and TPUs (TPU VMs). Plugins are no sign: libtpu is installed
# for `flaxpod plan` on machines without a TPU.
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def runs_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting it: the first of
    JAX_PLATFORMS when set, else whether the machine has no accelerator device file."""
    platforms = jax.config.jax_platforms or ""
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory for reuse (one arena, no mmap'd blocks, no trimming) in a
    process whose JAX runs on the CPU; returns whether it did (not on other C libraries or platforms).
    Memory stays with the process once used, and fragmentation adds to it: the big shape's 2-device job
    peaked at 2,887 MB resident against 1,932 MB with glibc's defaults (docs/benchmarks.md)."""
    if not runs_on_cpu():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in KEEP_FREED_MEMORY)
