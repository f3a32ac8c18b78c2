"""LoRA adapters for the stacked, scanned blocks (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

A projection `y = x W` with W of shape [*in, *out] gains `(alpha / r) * (x A) B`, A: [*in, r], B: [r, *out],
B initialised to zero so training starts from the base model exactly. Adapters are `nnx.LoRAParam`s
created inside the existing attention and MLP modules with the same leading `layers` axis as their
base weight, so they scan, split and merge like every other parameter; they carry the base weight's
logical axes on their non-rank side, so they shard by the same rules. (qwix's `apply_lora_to_model`
fails on these scanned blocks, and wrapping the base per adapter would re-stack it: see DESIGN.md.)

`LoRAParam` subclasses `Param`: a filter for base weights only is `nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`;
in pure-dict parameter trees adapters are `.../attn/lora/q_lora_a`, `.../lora/q_lora_b` and so on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flaxpod.model import axes as ax
from flaxpod.model.config import LoraConfig

SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
ADAPTERS = "lora"  # the attribute of Attention and MLP holding their Adapters


def _stacked(shape: tuple[int, ...], names: tuple, stack: int) -> tuple[tuple[int, ...], tuple]:
    return ((stack, *shape), (ax.LAYERS, *names)) if stack else (shape, names)


class Adapters(nnx.Module):
    """The adapters of one module's projections (those of `lora.targets` it has), e.g. q and v of attention.

    `shapes[name] = (in_shape, in_names, out_shape, out_names)` of the base weight `name`.
    """

    def __init__(self, lora: LoraConfig, shapes: dict[str, tuple], *, stack: int, rngs: nnx.Rngs):
        self.scale, self.rate, self.names = lora.scale, lora.dropout, tuple(n for n in shapes if n in lora.targets)
        r = lora.rank
        for name in self.names:
            in_shape, in_names, out_shape, out_names = shapes[name]
            fan_in = math.prod(in_shape)
            a_shape, a_names = _stacked((*in_shape, r), (*in_names, None), stack)
            b_shape, b_names = _stacked((r, *out_shape), (None, *out_names), stack)
            if lora.init == "kaiming":
                # PEFT's default: torch's kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                bound = 1.0 / math.sqrt(fan_in)
                a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
            else:  # PEFT's init_lora_weights="gaussian"
                a = jax.random.normal(rngs.params(), a_shape, jnp.float32) / r
            setattr(self, name + SUFFIX_A, nnx.LoRAParam(a, axes=a_names))
            setattr(self, name + SUFFIX_B, nnx.LoRAParam(jnp.zeros(b_shape, jnp.float32), axes=b_names))

    def __call__(self, name: str, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """`y` (= x W of base weight `name`) plus that weight's low-rank update, if it has an adapter."""
        if name not in self.names:
            return y
        a = getattr(self, name + SUFFIX_A)[...].astype(x.dtype)
        b = getattr(self, name + SUFFIX_B)[...].astype(x.dtype)
        n_in = a.ndim - 1
        if key is not None and self.rate > 0.0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.names.index(name)), 1.0 - self.rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        low = jnp.tensordot(x, a, axes=n_in)  # [..., r]
        return y + (self.scale * jnp.tensordot(low, b, axes=1)).astype(y.dtype)


def merge(params: dict, lora: LoraConfig) -> dict:
    """Pure-dict parameters with every adapter folded into its base weight (W + scale * A B, per layer)
    and removed: the plain model's parameters, for export. Host (numpy) in, host out; summed in float64."""

    def fold(node: dict) -> dict:
        out = {k: fold(v) if isinstance(v, dict) else v for k, v in node.items() if k != ADAPTERS}
        adapters = node.get(ADAPTERS) or {}
        for key in adapters:
            if key.endswith(SUFFIX_A):
                name = key[: -len(SUFFIX_A)]
                a, b = np.asarray(adapters[key], np.float64), np.asarray(adapters[name + SUFFIX_B], np.float64)
                # a: [layers, *in, r], b: [layers, r, *out] -> [layers, *in, *out]
                delta = np.stack([np.tensordot(a_l, b_l, axes=1) for a_l, b_l in zip(a, b, strict=True)])
                base = np.asarray(node[name])
                out[name] = (base.astype(np.float64) + lora.scale * delta).astype(base.dtype)
        return out

    return fold(params)


def adapter_paths(params: dict) -> list[tuple[str, ...]]:
    """Key paths of the adapter matrices of a pure-dict parameter tree."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [tuple(k.key for k in path) for path, _ in flat if ADAPTERS in (k.key for k in path)]
