"""Model FLOPs per token and peak FLOP/s, for MFU.

Convention (PaLM appendix B, as nanoGPT's estimate_mfu): 6 * N + 12 * n_layer * d_model * seq_len
FLOPs per token for forward and backward, where N excludes the token and position embeddings.
The LM-head matmul is therefore NOT counted (with tied embeddings it would otherwise be), which
keeps the figures comparable with nanoGPT's.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flaxpod.sharding.cpu_devices import cpu_compiler_options
from flaxpod.sharding.mesh import local_devices
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
CHIP_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def flops_per_token(n_layer: int, d_model: int, seq_len: int, n_params_nonembedding: int) -> float:
    return 6.0 * n_params_nonembedding + 12.0 * n_layer * d_model * seq_len


def measure_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul on the default device alone."""
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2.0 * size**3 / _best_seconds(lambda: f(a), repeats)


def measure_matmul_flops_per_device(mesh: Mesh, size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s per device of a float32 matmul run on all of the mesh's local devices at once, compiled with
    the options the trainer's steps get: the CPU 'peak' for MFU. Fake CPU devices share the host's cores,
    so one device measured alone (with every core in XLA's pool) overstates the share each device gets in
    a step; best of `repeats` so that a moment of load elsewhere does not pass for the peak."""
    return _matmul_flops_on(tuple(local_devices(mesh)), size, repeats)


@functools.cache  # once per process and device set: 2.6 s with the tests' 8 devices on 2 cores, per job
def _matmul_flops_on(devices: tuple, size: int, repeats: int) -> float:
    local = Mesh(np.array(devices), ("device",))
    x = jax.device_put(jnp.ones((len(devices), size, size), jnp.float32), NamedSharding(local, P("device")))
    square = jax.jit(lambda a: jnp.einsum("dij,djk->dik", a, a))
    f = square.lower(x).compile(compiler_options=cpu_compiler_options(local))
    f(x).block_until_ready()
    return 2.0 * size**3 / _best_seconds(lambda: f(x), repeats)


def _best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - t0)
    return best


def peak_flops_per_device(mesh: Mesh, override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one of the mesh's devices, where the figure came from)."""
    if override > 0:
        return override, "config logging.peak_flops"
    device = mesh.devices.flat[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in CHIP_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"{kind} bf16 peak"
    # CPU (or an unknown chip): what a matmul achieves here, measured now as the step runs.
    return measure_matmul_flops_per_device(mesh), "measured 1024x1024 float32 matmul on every device at once"
