"""Building blocks of the decoder: parameters with logical axes, norms, RoPE, attention, MLPs.

Blocks are created with a leading `stack` dimension (one slice per layer) so that the decoder
can `lax.scan` over them; inside the scan each module sees one layer's slice.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flaxpod.model import axes as ax
from flaxpod.model.axes import constrain
from flaxpod.model.config import ModelConfig
from flaxpod.model.lora import Adapters

Init = Literal["normal", "ones", "zeros"]


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


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; a no-op without a key (evaluation) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


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
        q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dtype))
        k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dtype))
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
        if mask is None:
            mask = attention_mask(None, t)
        groups = h // self.n_kv
        qg = q.reshape(b, t, self.n_kv, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = dropout(probs, self.cfg.dropout, dropout_key).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        return out.reshape(b, t, h, hd)

    def output(self, out: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        y = jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(out.dtype))
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
        self.gated = cfg.is_llama
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
        h = adapt("up", x, x @ self.up[...].astype(dtype))
        if self.up_bias is not None:
            h = h + self.up_bias[...].astype(dtype)
        if self.gated:
            h = jax.nn.silu(adapt("gate", x, x @ self.gate[...].astype(dtype))) * h
        else:
            h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new"
        h = constrain(h, (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
        y = h @ self.down[...].astype(dtype)
        if self.down_bias is not None:
            y = y + self.down_bias[...].astype(dtype)
        return adapt("down", h, y)
