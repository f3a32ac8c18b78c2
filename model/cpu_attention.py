"""Exact softmax attention on one CPU core through cpu_attention.cc (built with model/cpu_gemm.py's library).

Why: XLA:CPU runs the model's attention (model/layers.Attention.attend: heads-major transposes, query
blocks, batched dots, softmax fusions) as dozens of small ops per layer, each a pass over memory; in a
training step they cost far more than the same work alone. The kernel reads q, k and v in the model's
own [B, T, heads, D] layout (BLAS takes the head slices with their row strides), runs causal attention in
blocks of BLOCK_ROWS query rows that skip the keys above the diagonal (as attend does), and saves the
probabilities for the backward pass (FlashAttention's: dS = P * (dP - rowsum(dO * O))). On nanoGPT's
6-layer, 384-wide shape (2 devices, batch 16) the step took 0.89x the time of XLA's attention, with
64-row blocks (32: 0.90x, 128: 0.95x; docs/benchmarks.md, issue 16).

Contract (as attend's): q [B, T, H, D], k and v [B, S, KV, D] with H a multiple of KV, float32; mask
[1 or B, T, S] boolean or None; `causal` adds the causal mask and needs T == S. Masked keys get the score
bias layers.MASKED_SCORE, so a row with every key masked averages all values, as XLA's path does. Only
the forward and the hand-written backward exist (no higher derivatives, no dropout: attend keeps XLA's
path when dropout is on).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

FORWARD, BACKWARD = "flaxpod_attention_forward_f32", "flaxpod_attention_backward_f32"
BLOCK_ROWS = 64


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool) -> jax.Array:
    """softmax(q k^T / sqrt(D) + mask bias) v on this device, through the kernel (which must be registered:
    model/cpu_gemm.unavailable() is None)."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"cpu attention: causal needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
    bytes_mask = jnp.zeros((1, 1, 1), jnp.uint8) if mask is None else mask.astype(jnp.uint8)
    return _attention(causal, mask is not None, q, k, v, bytes_mask)


def _attributes(causal: bool, has_mask: bool) -> dict:
    return {"causal": causal, "has_mask": has_mask, "block": np.int64(BLOCK_ROWS)}


def _forward(causal, has_mask, q, k, v, mask):
    b, t, h, _ = q.shape
    shapes = jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, t, k.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(FORWARD, shapes, vmap_method="sequential")(q, k, v, mask, **_attributes(causal, has_mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(causal, has_mask, q, k, v, mask):
    return _forward(causal, has_mask, q, k, v, mask)[0]


def _attention_fwd(causal, has_mask, q, k, v, mask):
    out, probs = _forward(causal, has_mask, q, k, v, mask)
    return out, (q, k, v, mask, out, probs)


def _attention_bwd(causal, has_mask, saved, d_out):
    q, k, v, mask, out, probs = saved
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    backward = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="sequential")
    dq, dk, dv = backward(q, k, v, mask, out, probs, d_out, **_attributes(causal, has_mask))
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
