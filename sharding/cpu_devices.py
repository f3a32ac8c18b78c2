"""On CPU, one XLA device per core: the batch is split across cores (data parallelism) and each device
runs its step single-threaded.

Why: XLA:CPU runs the small matrix products of a small model on one thread (a [768, 128] @ [128, 128]
product took as long on one core as on two) and the ops of a transformer step mostly depend on each
other, so one device with a thread pool left a core idle most of the step. Two devices with one thread
each took nanoGPT's CPU shakespeare step from ~110 to ~80 ms and its 6-layer/384-wide shape from ~4.6 to
~4.2 s on two cores (docs/benchmarks.md, issue 16). JAX's CPU backend has one device unless told
otherwise before it starts, so `claim_cpu_devices` runs at the start of a training job.
"""

from __future__ import annotations

import math
import os
import typing

import jax
from flaxpod.sharding.host_memory import keep_freed_memory
from flaxpod.sharding.launch import DEVICE_COUNT_FLAG
from flaxpod.sharding.mesh import local_devices
from flaxpod.train.config import micro_batch_size

if typing.TYPE_CHECKING:
    from flaxpod.train.config import Config, MeshConfig
    from jax.sharding import Mesh

# Unmeasured beyond two cores; each data-parallel device holds a full copy of the parameters and optimizer
# state, so the automatic count stays small. `mesh.cpu_devices: N` asks for N.
MAX_AUTO_CPU_DEVICES = 8
# XLA compile options of a device that has a core to itself: Eigen's matrix products on the calling thread
# (YNN's are off: they would still fan out to the shared thread pool and contend with the other devices').
ONE_THREAD_OPTIONS = {"xla_cpu_multi_thread_eigen": False, "xla_cpu_experimental_ynn_fusion_type": ""}
# XLA:CPU removes optimization barriers before fusion (pass cse_barrier_expander); kept, the model's
# gradient barrier stops the residual gradient's cross-layer fusions (model/transformer.gradient_barrier).
KEEP_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_cpu_device_count(mesh: MeshConfig, micro_batch: int, cores: int) -> int | None:
    """How many CPU devices suit `mesh` and the per-step micro-batch: the product of the axis sizes when
    none is -1; else the most devices, at most one per core and MAX_AUTO_CPU_DEVICES, that the fixed axes
    divide and whose batch share (devices / tensor) splits the micro-batch evenly. None when the tensor
    axis is the one left open (-1: its size would depend on the count chosen here)."""
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 not in sizes:
        return fixed
    if mesh.tensor == -1:
        return None
    limit = max(fixed, min(cores, MAX_AUTO_CPU_DEVICES))
    fits = [n for n in range(fixed, limit + 1, fixed) if micro_batch % (n // mesh.tensor) == 0]
    return max(fits, default=fixed)


def claim_cpu_devices(cfg: Config) -> int | None:
    """Gives JAX's CPU backend `mesh.cpu_devices` devices (0: `auto_cpu_device_count`) if nothing decided
    the count already; returns the count set, or None when it was left alone: XLA_FLAGS names a count (the
    tests, `flaxpod launch`), the process is one of several (jax.distributed decides), or JAX's backends are
    already running. Accelerator runs are unaffected: the setting concerns only the CPU backend, whose
    devices they do not use."""
    if DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices != -1:
        return None
    if jax.distributed.is_initialized():
        return None
    count = cfg.mesh.cpu_devices or auto_cpu_device_count(cfg.mesh, micro_batch_size(cfg), usable_cores())
    if count is None:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends started earlier in this process (a library, an earlier job)
        return None
    return count


# glibc serves blocks larger than a thread arena's heap (64 MiB) with mmap, page-faulting them in anew at
# every step; below that the single arena's lock costs more than it saves (nanoGPT's CPU shape, ~16 MB of
# activations: 60-72 -> 77-94 ms/step with it; the 6-layer, 384-wide shape, ~415 MB: 4.2-4.7 -> 3.4-3.8 s).
KEEP_MEMORY_ABOVE_BYTES = 64 * 2**20


def step_activation_bytes(cfg: Config, devices: int) -> int:
    """A rough float32 size of what one device's training step keeps for its backward pass: per layer and
    token ~10 d_model-wide arrays, the MLP's hidden pair and a row of attention weights per head."""
    m = cfg.model
    tokens = micro_batch_size(cfg) * m.seq_len // max(devices, 1)
    return 4 * m.n_layer * tokens * (10 * m.d_model + 2 * m.mlp_width + m.n_head * m.seq_len)


def prepare_cpu_backend(cfg: Config) -> int | None:
    """What a training job does before JAX's backends start: the CPU backend gets its devices
    (claim_cpu_devices, whose count it returns) and, when a step's activations exceed
    KEEP_MEMORY_ABOVE_BYTES, glibc keeps the memory steps free (host_memory.keep_freed_memory, CPU only)."""
    count = claim_cpu_devices(cfg)
    if step_activation_bytes(cfg, count or 1) > KEEP_MEMORY_ABOVE_BYTES:
        keep_freed_memory()
    return count


def on_cpu(mesh: Mesh) -> bool:
    """Whether this process's devices of `mesh` are CPU devices."""
    local = local_devices(mesh)
    return bool(local) and local[0].platform == "cpu"


def core_per_device(mesh: Mesh) -> bool:
    """Whether `mesh`'s devices in this process are CPU devices with a core each (at least as many
    devices as usable cores: each runs its step on one thread)."""
    return on_cpu(mesh) and len(local_devices(mesh)) >= usable_cores()


def cpu_compiler_options(mesh: Mesh) -> dict:
    """On CPU devices KEEP_BARRIERS, plus ONE_THREAD_OPTIONS when they have a core each (a lone CPU device
    keeps XLA's thread pool); none on accelerators."""
    if not on_cpu(mesh):
        return {}
    return {**KEEP_BARRIERS, **(ONE_THREAD_OPTIONS if core_per_device(mesh) else {})}
