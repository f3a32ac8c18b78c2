"""Exact softmax attention (XLA, any backend) with a hand-written backward pass.

Shapes follow Attention.attend's heads-major layout: q [B, KV, G, T, D], k and v [B, KV, S, D], the
additive mask bias [B or 1, 1, 1, T, S], an optional boolean dropout keep-mask [B, KV, G, T, S] (one
byte per saved element, where a float multiplier would be four). The output is [B, KV, G, T, D] in v's
dtype.

Why not jax.grad of the forward: the gradients of k and v contract the score-sized [.., G, T, S]
arrays over (G, T), and JAX's transposition rule puts that array on the left of the product, where
XLA:CPU copies it into a transposed layout before the matmul (two score-sized copies per layer). Here
the score-sized operand sits on the right, in its own layout, and only the [.., T, D] operand and the
[.., D, S] result are transposed: at the nanoGPT big shape (T = 256, 6 heads of 64, batch 8) one
layer's attention forward + backward went from 107-118 ms to 68-76 ms on one core (PyTorch's fused
SDPA: 77; docs/benchmarks.md). The backward is FlashAttention's: dS = P * (dP - rowsum(dO * O)).
"""

import math
from functools import partial

import jax
import jax.numpy as jnp


def softmax_attention(q, k, v, bias, keep=None, rate: float = 0.0):
    """softmax(q k^T / sqrt(D) + bias) v, with inverted dropout at `rate` on the probabilities when the
    keep-mask `keep` is given."""
    return _attention(rate, q, k, v, bias, keep)


def apply_dropout(x, keep, rate: float):
    """Inverted dropout with a given keep-mask; x itself without one."""
    return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0)


def _forward(rate, q, k, v, bias, keep):
    """Deferred normalization, as FlashAttention does it: exp(scores - row max) times V, then the
    [.., T, D] output divided by the row sums, instead of normalizing the [.., T, S] probabilities (S/D
    times more elements); the scale goes on q for the same reason. The row max is a constant shift that
    cancels. Dropout on the unnormalized weights equals dropout on the probabilities."""
    qs = q * (1.0 / math.sqrt(q.shape[-1]))
    scores = jnp.einsum("bkgtd,bksd->bkgts", qs, k, preferred_element_type=jnp.float32) + bias
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    sums = jnp.sum(weights, axis=-1, keepdims=True)
    dropped = apply_dropout(weights, keep, rate)
    out = jnp.einsum("bkgts,bksd->bkgtd", dropped.astype(v.dtype), v, preferred_element_type=jnp.float32) / sums
    return out, (qs, weights, sums, out)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(rate, q, k, v, bias, keep):
    return _forward(rate, q, k, v, bias, keep)[0].astype(v.dtype)


def _attention_fwd(rate, q, k, v, bias, keep):
    out, saved = _forward(rate, q, k, v, bias, keep)
    return out.astype(v.dtype), (k, v, keep, *saved)


def _attention_bwd(rate, res, d_out):
    k, v, keep, qs, weights, sums, out = res
    d_out = d_out.astype(jnp.float32)
    d_unnormalized = d_out / sums  # gradient of the product before the division by the row sums
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True) / sums  # through the row sums
    d_dropped = jnp.einsum("bkgtd,bksd->bkgts", d_unnormalized.astype(v.dtype), v, preferred_element_type=jnp.float32)
    d_scores = weights * (apply_dropout(d_dropped, keep, rate) - delta)
    dropped = apply_dropout(weights, keep, rate)  # recomputed: saving it would cost a score-sized residual
    # [B, KV, D, S] products over (G, T) with the score-sized operand on the right (the module docstring).
    # Their outputs are in the inputs' dtype, which they are rounded to anyway: XLA:CPU has no
    # bfloat16 x bfloat16 = float32 kernel for this form (tests/test_softmax_attention.py).
    over_gt = (((2, 3), (2, 3)), ((0, 1), (0, 1)))
    dv = jax.lax.dot_general(d_unnormalized.astype(v.dtype), dropped.astype(v.dtype), over_gt)
    dk = jax.lax.dot_general(qs, d_scores.astype(qs.dtype), over_gt)
    dq = jnp.einsum("bkgts,bksd->bkgtd", d_scores.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dq = dq * (1.0 / math.sqrt(qs.shape[-1]))
    grads = dq.astype(qs.dtype), jnp.swapaxes(dk, -1, -2).astype(k.dtype), jnp.swapaxes(dv, -1, -2)
    return (*grads, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
