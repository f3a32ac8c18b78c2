"""Building blocks of the decoder: parameters with logical axes, norms, RoPE, attention, MLPs.

Blocks are created with a leading `stack` dimension (one slice per layer) so that the decoder
can `lax.scan` over them; inside the scan each module sees one layer's slice.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flaxpod.model import axes as ax
from flaxpod.model.axes import constrain
from flaxpod.model.config import ModelConfig
from flaxpod.model.lora import Adapters
from flaxpod.model.softmax_attention import apply_dropout, softmax_attention

Init = Literal["normal", "ones", "zeros"]
# Causal self-attention from this length on runs in this many query blocks (Attention.attend). Measured on
# the CPU, 6 layers of 384, 2 devices (docs/benchmarks.md): at T = 256, 4 blocks of 64 rows beat 2 of 128
# by 6-7% of the whole step and 8 of 32 lost; at T = 128 and 64 one block was fastest; at T = 512, 2, 4
# and 8 blocks were within noise. A fixed count also keeps long contexts' graphs small.
CAUSAL_BLOCKS = 4
CAUSAL_BLOCKING_FROM = 256


def causal_block_rows(length: int) -> int:
    """Query rows per block of causal self-attention over `length` tokens (the last block may be shorter)."""
    return -(-length // CAUSAL_BLOCKS) if length >= CAUSAL_BLOCKING_FROM else length


MASKED_SCORE = -1e30  # attention score bias of a masked key


def make_param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    names: tuple[str | None, ...],
    stack: int,
    init: Init = "normal",
    std: float = 0.02,
) -> nnx.Param:
    """A float32 parameter of `shape` (with `stack` layers in front when stack > 0).

    `axes` metadata holds the logical axis names; sharding/rules.py maps them to the mesh.
    """
    if stack:
        shape, names = (stack, *shape), (ax.LAYERS, *names)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:  # a typo must not quietly give zeros
        raise ValueError(f"make_param: init expected one of {list(typing.get_args(Init))}, got {init!r}")
    return nnx.Param(value, axes=names)


# A 2-D product (x, w, preferred_element_type) -> x @ w. XLA's dot unless a step installs another while it
# is traced (sharding/cpu_matmul.py: OpenBLAS on CPU devices that have a core each).
Matmul = Callable[[jax.Array, jax.Array, Any], jax.Array]


def xla_matmul(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=preferred_element_type)


# Attention over one step's q [B, T, H, D], k and v [B, S, KV, D], mask [B or 1, T, S] or None, and whether it is
# causal -> [B, T, H, D], or None where the kernel does not apply (Attention.attend then runs XLA's). None
# installed by default (sharding/cpu_matmul.py: OpenBLAS attention where the products go through OpenBLAS).
AttentionKernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None, bool], jax.Array | None]

_matmul: contextvars.ContextVar[Matmul] = contextvars.ContextVar("matmul", default=xla_matmul)
_attention_kernel: contextvars.ContextVar[AttentionKernel | None] = contextvars.ContextVar("attention", default=None)


@contextlib.contextmanager
def step_kernels(matmul: Matmul, attention: AttentionKernel | None = None) -> Iterator[None]:
    """Within this block (while tracing), `dense` multiplies with `matmul` and attention runs `attention`
    where it applies."""
    tokens = _matmul.set(matmul), _attention_kernel.set(attention)
    try:
        yield
    finally:
        _matmul.reset(tokens[0])
        _attention_kernel.reset(tokens[1])


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1, preferred_element_type=None) -> jax.Array:
    """x [..., *w.shape[:in_dims]] contracted with w -> [..., *w.shape[in_dims:]], as ONE 2-D matmul.

    Why not an einsum over [B, T, ...]: the weight gradient of such an einsum contracts two dimensions
    (batch and time), and XLA:CPU lowers that by physically transposing an activation-sized operand,
    usually fused into the elementwise code that produces it, where the strided writes made those
    fusions a third of the CPU step (tools/bench_vs_torch.py; docs/benchmarks.md). Flattened to
    [B*T, in] @ [in, out], the forward and both gradients are plain matrix products that take
    transposed operands without copies. The reshapes are free (row-major bitcasts), and the merged
    leading dimension keeps the batch sharding (the length axis is never sharded).
    """
    lead = x.shape[: x.ndim - in_dims]
    k = math.prod(w.shape[:in_dims])
    y = _matmul.get()(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type)
    return y.reshape(*lead, *w.shape[in_dims:])


def dropout_mask(shape: tuple[int, ...], rate: float, key: jax.Array | None) -> jax.Array | None:
    """Inverted dropout's boolean keep-mask; None without a key (evaluation) or at rate 0."""
    if key is None or rate == 0.0:
        return None
    return jax.random.bernoulli(key, 1.0 - rate, shape)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; a no-op without a key (evaluation) or at rate 0."""
    keep = dropout_mask(x.shape, rate, key)
    return x if keep is None else apply_dropout(x, keep, rate).astype(x.dtype)


class Norm(nnx.Module):
    """LayerNorm (with optional bias) or RMSNorm; statistics in float32."""

    def __init__(self, dim: int, *, rms: bool, bias: bool, eps: float, stack: int = 0):
        self.rms, self.eps = rms, eps
        self.scale = make_param(None, (dim,), (ax.NORM,), stack, init="ones")
        self.bias = make_param(None, (dim,), (ax.NORM,), stack, init="zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        if self.rms:
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(h, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        h = h * self.scale[...]
        if self.bias is not None:
            h = h + self.bias[...]
        return h.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the "rotate half" layout of Hugging Face's Llama, so weights
    exchange with it without permutation. x: [B, T, heads, head_dim], positions: [B, T]."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array | None, length: int, *, causal: bool = True) -> jax.Array:
    """[B or 1, T, T] boolean: causal (or, for encoders, bidirectional), and within one document when
    segment ids are given."""
    allowed = jnp.tril(jnp.ones((length, length), dtype=bool))[None] if causal else jnp.ones((1, length, length), bool)
    if segment_ids is None:
        return allowed
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return allowed & same_doc


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, stack: int, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.cfg, self.n_head, self.n_kv, self.head_dim = cfg, h, kv, hd
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        self.q = make_param(rngs, (d, h, hd), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), stack, std=cfg.init_std)
        self.k = make_param(rngs, (d, kv, hd), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), stack, std=cfg.init_std)
        self.v = make_param(rngs, (d, kv, hd), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), stack, std=cfg.init_std)
        self.o = make_param(rngs, (h, hd, d), (ax.HEADS, ax.HEAD_DIM, ax.EMBED), stack, std=out_std)
        if cfg.has_bias:
            self.q_bias = make_param(None, (h, hd), (ax.HEADS, ax.HEAD_DIM), stack, init="zeros")
            self.k_bias = make_param(None, (kv, hd), (ax.KV_HEADS, ax.HEAD_DIM), stack, init="zeros")
            self.v_bias = make_param(None, (kv, hd), (ax.KV_HEADS, ax.HEAD_DIM), stack, init="zeros")
            self.o_bias = make_param(None, (d,), (ax.EMBED,), stack, init="zeros")
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
        shapes = {
            "q": ((d,), (ax.EMBED,), (h, hd), (ax.HEADS, ax.HEAD_DIM)),
            "k": ((d,), (ax.EMBED,), (kv, hd), (ax.KV_HEADS, ax.HEAD_DIM)),
            "v": ((d,), (ax.EMBED,), (kv, hd), (ax.KV_HEADS, ax.HEAD_DIM)),
            "o": ((h, hd), (ax.HEADS, ax.HEAD_DIM), (d,), (ax.EMBED,)),
        }
        self.lora = Adapters(cfg.lora, shapes, stack=stack, rngs=rngs) if cfg.lora.rank else None

    def project_qkv(
        self, x: jax.Array, positions: jax.Array, lora_key: jax.Array | None = None
    ) -> tuple[jax.Array, ...]:
        dtype = x.dtype
        q = dense(x, self.q[...].astype(dtype))
        k = dense(x, self.k[...].astype(dtype))
        v = dense(x, self.v[...].astype(dtype))
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(dtype)
            k = k + self.k_bias[...].astype(dtype)
            v = v + self.v_bias[...].astype(dtype)
        if self.lora is not None:
            q, k, v = (self.lora(name, x, y, lora_key) for name, y in (("q", q), ("k", k), ("v", v)))
        if self.cfg.is_llama:
            q = rope(q, positions, self.cfg.rope_theta)
            k = rope(k, positions, self.cfg.rope_theta)
        q = constrain(q, (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
        k = constrain(k, (ax.BATCH, ax.LENGTH, ax.ACT_KV_HEADS, None))
        v = constrain(v, (ax.BATCH, ax.LENGTH, ax.ACT_KV_HEADS, None))
        return q, k, v

    def attend(self, q, k, v, mask: jax.Array | None, dropout_key: jax.Array | None) -> jax.Array:
        """q: [B, T, H, D]; k, v: [B, S, KV, D]; mask: [B or 1, T, S], or None for plain causal attention
        (T == S). Returns [B, T, H, D]. Fused kernels get None as `is_causal` with no mask: cuDNN then runs
        its causal mask type and skips the masked blocks, whereas a boolean mask reaches it as a [B, 1, T, S]
        additive bias (jax's combine_bias_and_mask) whose gradient it computes too."""
        b, t, h, hd = q.shape
        if self.cfg.attention == "fused" and not (dropout_key is not None and self.cfg.dropout):
            causal, mask = (True, None) if mask is None else (False, mask[:, None])
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=causal, implementation=self.cfg.attention_impl
            )
        kernel = _attention_kernel.get()
        if kernel is not None and not (dropout_key is not None and self.cfg.dropout):
            # Causal as the query blocks below assume it: no mask (plain causal), or a decoder's self-attention.
            causal = mask is None or (not self.cfg.bidirectional and t == k.shape[1])
            out = kernel(q, k, v, mask, causal)
            if out is not None:
                return out
        if mask is None:
            mask = attention_mask(None, t)
        groups = h // self.n_kv
        # Heads-major layout ([B, KV, G, T, D], as PyTorch's SDPA takes it), transposed once here: then
        # both products and their gradients are batched matmuls in XLA's canonical form (batch dims
        # first, contraction last), where contracting a [B, T, KV, G, D] array directly made XLA:CPU
        # transpose several score-sized operands per layer (1.3-1.6x slower attention; docs/benchmarks.md).
        qg = q.reshape(b, t, self.n_kv, groups, hd).transpose(0, 2, 3, 1, 4)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        rows = causal_block_rows(t)
        if self.cfg.bidirectional or t != k.shape[1] or rows >= t:
            out = self._softmax_attend(qg, kt, vt, mask, dropout_key)
        else:
            # Causal self-attention in query blocks: block i needs only the keys up to its last query,
            # so the all-masked upper-right score blocks are never computed (the saving FlashAttention's
            # causal mode makes: 4 blocks compute 10 of 16 score blocks). Exact: the skipped
            # keys have probability 0.
            outs = []
            for start in range(0, t, rows):
                end = min(start + rows, t)
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, start)
                block = qg[:, :, :, start:end], kt[:, :, :end], vt[:, :, :end], mask[:, start:end, :end]
                outs.append(self._softmax_attend(*block, key))
            out = jnp.concatenate(outs, axis=3)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)

    def _softmax_attend(self, qg, kt, vt, mask: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """qg: [B, KV, G, T, D]; kt, vt: [B, KV, S, D]; mask: [B or 1, T, S]. Returns [B, KV, G, T, D]."""
        # The mask as an additive bias built once on [B or 1, T, S] (no head dims): the add fuses into the
        # scores' product where a select did not (~15% of the attention time on CPU). -1e30, not -inf: a
        # row with every key masked then gets finite (uniform) weights instead of NaN.
        bias = jnp.where(mask, 0.0, MASKED_SCORE)[:, None, None]
        keep = dropout_mask((*qg.shape[:-1], kt.shape[2]), self.cfg.dropout, dropout_key)
        return softmax_attention(qg, kt, vt, bias, keep, self.cfg.dropout)

    def output(self, out: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        y = dense(out, self.o[...].astype(out.dtype), in_dims=2)
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(y.dtype)
        return y if self.lora is None else self.lora("o", out, y, lora_key)

    def __call__(self, x, positions, mask, dropout_key=None, lora_key=None) -> jax.Array:
        q, k, v = self.project_qkv(x, positions, lora_key)
        return self.output(self.attend(q, k, v, mask, dropout_key), lora_key)


class MLP(nnx.Module):
    """GELU MLP (gpt2) or SwiGLU (llama)."""

    def __init__(self, cfg: ModelConfig, *, stack: int, rngs: nnx.Rngs):
        d, d_ff = cfg.d_model, cfg.mlp_width
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        self.gated, self.width, self.block_width = cfg.is_llama, d_ff, d_ff // cfg.mlp_chunks
        bias = cfg.has_bias
        self.up = make_param(rngs, (d, d_ff), (ax.EMBED, ax.MLP), stack, std=cfg.init_std)
        self.gate = make_param(rngs, (d, d_ff), (ax.EMBED, ax.MLP), stack, std=cfg.init_std) if self.gated else None
        self.down = make_param(rngs, (d_ff, d), (ax.MLP, ax.EMBED), stack, std=out_std)
        self.up_bias = make_param(None, (d_ff,), (ax.MLP,), stack, init="zeros") if bias else None
        self.down_bias = make_param(None, (d,), (ax.EMBED,), stack, init="zeros") if bias else None
        into, out_of = ((d,), (ax.EMBED,), (d_ff,), (ax.MLP,)), ((d_ff,), (ax.MLP,), (d,), (ax.EMBED,))
        shapes = {"up": into, "gate": into, "down": out_of} if self.gated else {"up": into, "down": out_of}
        self.lora = Adapters(cfg.lora, shapes, stack=stack, rngs=rngs) if cfg.lora.rank else None

    def __call__(self, x: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        dtype = x.dtype
        adapt = (
            (lambda name, x_, y_: y_) if self.lora is None else (lambda name, x_, y_: self.lora(name, x_, y_, lora_key))
        )
        # The hidden width in blocks (model.mlp_chunks; one block by default): down(act(up x)) is a sum over
        # hidden units, so each block's up product, activation and down product is computed alone and
        # the partial outputs are added.
        y = None
        for start in range(0, self.width, self.block_width):
            cols = slice(start, start + self.block_width)
            h = adapt("up", x, dense(x, self.up[...][:, cols].astype(dtype)))
            if self.up_bias is not None:
                h = h + self.up_bias[...][cols].astype(dtype)
            if self.gated:
                h = jax.nn.silu(adapt("gate", x, dense(x, self.gate[...][:, cols].astype(dtype)))) * h
            else:
                h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new"
            h = constrain(h, (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
            part = dense(h, self.down[...][cols].astype(dtype))
            y = part if y is None else y + part
        if self.down_bias is not None:
            y = y + self.down_bias[...].astype(dtype)
        return adapt("down", h, y)  # with LoRA there is one block (the config refuses more): h is whole
