"""The hand-written attention backward (model/softmax_attention.py) against jax.grad of a plain
softmax attention, and the layout property it exists for."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flaxpod.model.softmax_attention import softmax_attention

B, KV, G, T, D = 2, 2, 3, 24, 8


RATE = 0.25


def reference(q, k, v, bias, keep):
    """Textbook attention, differentiated by JAX: normalized probabilities, then inverted dropout."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k) / math.sqrt(q.shape[-1]) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    if keep is not None:
        probs = probs * keep / (1 - RATE)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v)


def inputs(dtype=jnp.float32, *, dropout=False, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (B, KV, G, T, D), dtype)
    k = jax.random.normal(keys[1], (B, KV, T, D), dtype)
    v = jax.random.normal(keys[2], (B, KV, T, D), dtype)
    # Causal, two packed documents in row 0, and a query row that may see no key at all (row 1, t = 0):
    # the -1e30 bias then gives it uniform weights in both implementations rather than NaN.
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & jnp.ones((B, 1, 1), bool)
    doc = jnp.arange(T) >= 10
    allowed = allowed.at[0].set(allowed[0] & (doc[:, None] == doc[None, :]))
    allowed = allowed.at[1, 0, 0].set(False)
    bias = jnp.where(allowed, 0.0, -1e30)[:, None, None]
    keep = None
    if dropout:
        keep = jax.random.bernoulli(keys[3], 1 - RATE, (B, KV, G, T, T))
    cotangent = jax.random.normal(keys[4], (B, KV, G, T, D), dtype)
    return (q, k, v, bias, keep), cotangent


def ours(q, k, v, bias, keep):
    return softmax_attention(q, k, v, bias, keep, RATE)


def value_and_grads(fn, args, cotangent):
    """Output and (dq, dk, dv), forward and backward compiled together as in a training step."""

    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *args[3:]), q, k, v)
        return (out, *vjp(cotangent))

    return jax.jit(run)(*args[:3], cotangent)


@pytest.mark.parametrize("dropout", [False, True])
def test_equals_autodiff_of_plain_attention(dropout):
    args, cotangent = inputs(dropout=dropout)
    got = value_and_grads(ours, args, cotangent)
    want = value_and_grads(reference, args, cotangent)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6, err_msg=name)


def test_bfloat16_as_close_to_float32_as_autodiff():
    """In bfloat16 the hand-written backward is no further from the float32 result than JAX's own
    gradient of the plain attention (both round their products' operands to bfloat16)."""
    args, cotangent = inputs(jnp.bfloat16)
    exact = value_and_grads(
        reference, jax.tree.map(lambda x: x.astype(jnp.float32), args), cotangent.astype(jnp.float32)
    )
    mine = value_and_grads(ours, args, cotangent)
    autodiff = value_and_grads(reference, args, cotangent)
    for name, e, a, b in zip(("out", "dq", "dk", "dv"), exact, mine, autodiff, strict=True):
        assert a.dtype == jnp.bfloat16, name
        err_ours = float(jnp.max(jnp.abs(a.astype(jnp.float32) - e)))
        err_autodiff = float(jnp.max(jnp.abs(b.astype(jnp.float32) - e)))
        assert err_ours <= 1.5 * err_autodiff + 1e-3, (name, err_ours, err_autodiff)


def score_sized_copies(fn, args, cotangent) -> list[str]:
    """Instructions of the compiled forward + backward that write a transposed copy of a score-sized
    [B, KV, G, T, S] array (XLA:CPU names them after the transpose/copy they start with)."""
    q, k, v, bias, keep = args

    def grads(q, k, v):
        return jax.vjp(lambda q, k, v: fn(q, k, v, bias, keep), q, k, v)[1](cotangent)

    text = jax.jit(grads).lower(q, k, v).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    score_elements = B * KV * G * T * T
    found = []
    for line in entry.splitlines():
        m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = f32\[([\d,]*)\]", line)
        if m and re.match(r"(transpose|copy)", m.group(1)) and m.group(2):
            if math.prod(int(n) for n in m.group(2).split(",")) == score_elements:
                found.append(m.group(1))
    return found


def test_backward_does_not_transpose_score_sized_arrays():
    """What the module is for: JAX's own gradient makes XLA:CPU copy the score-sized arrays into a
    transposed layout for the dK and dV products (the reference shows the check can see that); the
    hand-written backward does not."""
    args, cotangent = inputs()
    assert score_sized_copies(reference, args, cotangent), "the check no longer sees autodiff's copies"
    assert score_sized_copies(ours, args, cotangent) == []
