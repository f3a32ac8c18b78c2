"""The decoder-only transformer: GPT-2 and Llama families from one module, chosen by config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flaxpod.model import axes as ax
from flaxpod.model.axes import constrain
from flaxpod.model.config import ModelConfig
from flaxpod.model.layers import MLP, Attention, Norm, attention_mask, dense, dropout, make_param

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """The identity, whose gradient passes `lax.optimization_barrier`: XLA materializes the residual
    stream's gradient at each block instead of fusing it across layers. Without it XLA:CPU fused the
    gradient chain of all later layers into one loop fusion per layer that recomputed their LayerNorm
    backward (74-120 operands at 6 layers; docs/benchmarks.md, issue 16). XLA:CPU drops barriers before
    fusion unless its `cse_barrier_expander` pass is off (sharding/cpu_devices.cpu_compiler_options)."""
    return x


gradient_barrier.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


class Block(nnx.Module):
    """Pre-norm residual block. Built with `stack` layers; called on one layer's slice."""

    def __init__(self, cfg: ModelConfig, *, stack: int, rngs: nnx.Rngs):
        self.dropout_rate = cfg.dropout
        self.attn_norm = Norm(cfg.d_model, rms=cfg.is_llama, bias=cfg.has_bias, eps=cfg.norm_eps, stack=stack)
        self.attn = Attention(cfg, stack=stack, rngs=rngs)
        self.mlp_norm = Norm(cfg.d_model, rms=cfg.is_llama, bias=cfg.has_bias, eps=cfg.norm_eps, stack=stack)
        self.mlp = MLP(cfg, stack=stack, rngs=rngs)

    def __call__(self, x, positions, mask, key: jax.Array | None) -> jax.Array:
        x = gradient_barrier(x)
        keys = jax.random.split(key, 3) if key is not None else (None, None, None)
        lora_key = None if key is None else jax.random.fold_in(key, 3)  # LoRA dropout; unused without adapters
        h = self.attn(self.attn_norm(x), positions, mask, keys[0], lora_key)
        x = x + dropout(h, self.dropout_rate, keys[1])
        h = self.mlp(self.mlp_norm(x), lora_key)
        x = x + dropout(h, self.dropout_rate, keys[2])
        return constrain(x, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))


class Transformer(nnx.Module):
    """tokens [B, T] -> float32 logits [B, T, vocab].

    `segment_ids` (0 = padding, 1.. = documents) keep attention inside a document of a packed
    row; `positions` restart per document. Without them the row is one causal sequence.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        self.cfg = cfg
        d = cfg.d_model
        self.embed = make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), 0, std=cfg.init_std)
        self.pos_embed = (
            make_param(rngs, (cfg.max_len, d), (ax.POSITION, ax.EMBED), 0, std=cfg.init_std)
            if cfg.learned_positions
            else None
        )
        self.blocks = Block(cfg, stack=cfg.n_layer, rngs=rngs)
        self.final_norm = Norm(d, rms=cfg.is_llama, bias=cfg.has_bias, eps=cfg.norm_eps)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else make_param(rngs, (d, cfg.vocab_size), (ax.EMBED, ax.VOCAB), 0, std=cfg.init_std)
        )
        # Sequence classification (finetuning): a linear map of the pooled final hidden state, without
        # bias like Hugging Face's `score` layer of ...ForSequenceClassification, so it exports exactly.
        self.cls_head = (
            make_param(rngs, (d, cfg.num_labels), (ax.EMBED, None), 0, std=cfg.init_std) if cfg.num_labels else None
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        x = self.hidden(tokens, segment_ids=segment_ids, positions=positions, dropout_key=dropout_key)
        return constrain(vocab_logits(x, self.head_matrix()), (ax.BATCH, ax.LENGTH, ax.ACT_VOCAB))

    def head_matrix(self) -> jax.Array:
        """The LM head [d_model, vocab] (float32 parameter): the embedding's transpose when tied. The plain
        logits and the chunked loss (train/objectives.py) both project hidden states with it."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def classify(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Class logits [B, num_labels] (float32) of rows holding one example each; `segment_ids`
        is 1 on the example's tokens and 0 on padding (tokens first, padding after)."""
        if self.cls_head is None:
            raise ValueError("model.num_labels is 0: this model has no classification head")
        x = self.hidden(tokens, segment_ids=segment_ids, positions=positions, dropout_key=dropout_key)
        pooled = pool(x.astype(jnp.float32), segment_ids > 0, self.cfg.pooling)
        return pooled @ self.cls_head[...]

    def hidden(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """The final normalized hidden states [B, T, d_model] (compute dtype)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        keys = (None,) * 2 if dropout_key is None else tuple(jax.random.split(dropout_key, 2))

        x = jnp.take(self.embed[...], tokens, axis=0)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0)
        x = constrain(dropout(x, cfg.dropout, keys[0]).astype(dtype), (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))
        # None: one causal sequence per row, which fused attention kernels take as `is_causal` (no mask).
        plain_causal = segment_ids is None and not cfg.bidirectional
        mask = None if plain_causal else attention_mask(segment_ids, t, causal=not cfg.bidirectional)
        x = self.run_blocks(x, positions, mask, keys[1])
        return self.final_norm(x)

    def run_blocks(self, x, positions, mask, key: jax.Array | None) -> jax.Array:
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.blocks)
        layer_keys = None if key is None else jax.random.split(key, cfg.n_layer)

        def body(h, layer):
            params, layer_key = layer
            return nnx.merge(graphdef, params)(h, positions, mask, layer_key), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, (stacked, layer_keys))
            return x
        for i in range(cfg.n_layer):
            params_i = jax.tree.map(lambda a, i=i: a[i], stacked)
            x, _ = body(x, (params_i, None if layer_keys is None else layer_keys[i]))
        return x


def vocab_logits(x: jax.Array, head: jax.Array) -> jax.Array:
    """Hidden states [B, T, d] (compute dtype) times the head [d, V] -> float32 logits [B, T, V]."""
    return dense(x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def pool(x: jax.Array, valid: jax.Array, how: str) -> jax.Array:
    """[B, T, d] -> [B, d] over each row's valid positions: `last` (the last valid token, which a
    causal model's attention lets see the whole example), `mean`, or `first`."""
    if how == "last":
        last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if how == "mean":
        w = valid.astype(x.dtype)[..., None]
        return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    if how == "first":
        return x[:, 0]
    raise ValueError(f"model.pooling: expected last, mean or first, got {how!r}")


def count_params(params, *, exclude_embeddings: bool = False) -> int:
    """Parameter count of a (pure-dict) parameter tree; without the token and position
    embeddings when asked (the PaLM/nanoGPT MFU convention)."""
    total = sum(x.size for x in jax.tree.leaves(params))
    if exclude_embeddings:
        total -= params["embed"].size
        if params.get("pos_embed") is not None:
            total -= params["pos_embed"].size
    return total
