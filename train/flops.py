"""Model FLOPs per token and peak FLOP/s, for MFU.

Convention (PaLM appendix B, as nanoGPT's estimate_mfu): 6 * N + 12 * n_layer * d_model * seq_len
FLOPs per token for forward and backward, where N excludes the token and position embeddings.
The LM-head matmul is therefore NOT counted (with tied embeddings it would otherwise be), which
keeps the figures comparable with nanoGPT's.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

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
    """FLOP/s of a large float32 matmul on the default device (the CPU 'peak' for MFU)."""
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if override > 0:
        return override, "config logging.peak_flops"
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in CHIP_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"{kind} bf16 peak"
    # CPU (or an unknown chip): what a large matmul achieves here, measured now. All fake CPU
    # devices share the same cores, so the per-device figure is the host figure / device count.
    host = measure_matmul_flops()
    return host / max(jax.local_device_count(), 1), "measured 1024x1024 float32 matmul"
