"""Autoregressive decoding with a key/value cache, and the cache-free reference it must match.

Prompts of different lengths are left-padded into one [B, P] array, so every row writes its
next token into the same cache column and one scalar index drives the whole batch; each row's
positions start at 0 on its first real token and padding columns are masked out of attention.
The cache holds every layer's keys and values, [layers, B, P + max_new_tokens, kv_heads, head_dim].

Sampling is greedy at temperature 0, else from softmax(logits / temperature) restricted to the
top-k ids and to the smallest set whose probability reaches top-p. Step i draws with
fold_in(key, i), so a seed fixes the output, and the cached and cache-free decoders draw the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from flaxpod.model.config import ModelConfig
from flaxpod.model.transformer import Transformer


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (top_k and top_p are then unused)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a probability in (0, 1], got {self.top_p}")


def sample_token(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """[B, V] float32 logits -> [B] int32 ids."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep an id while the mass of the ids before it is below top_p (the first always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def init_cache(model: Transformer, batch: int, length: int) -> dict[str, jax.Array]:
    cfg = model.cfg
    shape = (cfg.n_layer, batch, length, cfg.kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward_cached(
    model: Transformer,
    tokens: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    cache: dict[str, jax.Array],
    index: jax.Array | int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, T, V] for `tokens` [B, T] placed at cache columns index..index+T-1.

    `valid` [B, S] marks the cache columns that hold real tokens (False on left padding).
    Mirrors Transformer.__call__ / Block.__call__ (without dropout), with attention over the
    cache instead of over the call's own tokens.
    """
    cfg = model.cfg
    dtype = jnp.dtype(cfg.dtype)
    t = tokens.shape[1]
    s = cache["k"].shape[2]
    x = jnp.take(model.embed[...], tokens, axis=0)
    if model.pos_embed is not None:
        x = x + jnp.take(model.pos_embed[...], positions, axis=0)
    x = x.astype(dtype)
    query_cols = index + jnp.arange(t)[:, None]  # [T, 1]
    key_cols = jnp.arange(s)[None, :]  # [1, S]
    # A padding query sees only itself, so no softmax row is empty.
    mask = (valid[:, None, :] | (key_cols == query_cols)[None]) & (key_cols <= query_cols)[None]

    graphdef, stacked = nnx.split(model.blocks)

    def body(h, layer):
        params, k_cache, v_cache = layer
        block = nnx.merge(graphdef, params)
        q, k, v = block.attn.project_qkv(block.attn_norm(h), positions)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        h = h + block.attn.output(block.attn.attend(q, k_cache, v_cache, mask, None))
        h = h + block.mlp(block.mlp_norm(h))
        return h, (k_cache, v_cache)

    x, (k_all, v_all) = jax.lax.scan(body, x, (stacked, cache["k"], cache["v"]))
    x = model.final_norm(x)
    head = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)
    return logits, {"k": k_all, "v": v_all}


def _prompt_layout(tokens: jax.Array, lengths: jax.Array, total: int) -> tuple[jax.Array, jax.Array]:
    """(valid [B, total], positions [B, total]) for left-padded prompts of `lengths`."""
    p = tokens.shape[1]
    cols = jnp.arange(total)[None, :]
    pad = (p - lengths)[:, None]
    return cols >= pad, jnp.maximum(cols - pad, 0).astype(jnp.int32)


def check_lengths(model_cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Learned position embeddings (gpt2) end at max_seq_len; RoPE (llama) has no hard end."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected a positive count, got {max_new_tokens}")
    limit = model_cfg.max_len
    if model_cfg.learned_positions and prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"{limit} positions (model.max_seq_len); shorten the prompt or generate fewer tokens"
        )


def make_generate(
    graphdef: nnx.GraphDef,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    use_cache: bool = True,
) -> Callable[[dict, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """A jitted `(params, tokens [B, P], lengths [B], key) -> (new_tokens [B, N], counts [B])`.

    `tokens` are left-padded prompts (row b's prompt is its last lengths[b] columns). Row b's
    continuation is new_tokens[b, :counts[b]]; generation stops at `eos_id` (not counted) or
    after max_new_tokens, and the loop ends early once every row has stopped. `vocab_limit`
    keeps sampling inside the tokenizer's ids when the embedding has padding rows.
    `use_cache=False` recomputes the whole sequence each step: the reference for tests and
    benchmarks.
    """
    n = max_new_tokens
    stop = -1 if eos_id is None else eos_id

    def pick(logits, key, i):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        return sample_token(logits, jax.random.fold_in(key, i), sampling)

    def loop(first_logits, key, advance, extra):
        """Runs the shared stop/record logic; `advance(extra, tokens, i)` -> (logits, extra)."""
        b = first_logits.shape[0]

        def cond(carry):
            i, _, _, _, done, _ = carry
            return (i < n) & ~jnp.all(done)

        def body(carry):
            i, logits, out, counts, done, extra = carry
            token = jnp.where(done, 0, pick(logits, key, i))
            finished = done | (token == stop)
            out = out.at[:, i].set(jnp.where(finished, 0, token))
            counts = counts + (~finished).astype(jnp.int32)
            logits, extra = advance(extra, token, i)
            return i + 1, logits, out, counts, finished, extra

        init = (
            jnp.int32(0),
            first_logits,
            jnp.zeros((b, n), jnp.int32),
            jnp.zeros((b,), jnp.int32),
            jnp.zeros((b,), bool),
            extra,
        )
        _, _, out, counts, _, _ = jax.lax.while_loop(cond, body, init)
        return out, counts

    def generate_cached(params, tokens, lengths, key):
        model = nnx.merge(graphdef, params)
        b, p = tokens.shape
        valid, positions = _prompt_layout(tokens, lengths, p + n)
        logits, cache = forward_cached(model, tokens, positions[:, :p], valid, init_cache(model, b, p + n), 0)

        def advance(cache, token, i):
            logits, cache = forward_cached(model, token[:, None], positions[:, p + i, None], valid, cache, p + i)
            return logits[:, 0], cache

        return loop(logits[:, -1], key, advance, cache)

    def generate_uncached(params, tokens, lengths, key):
        model = nnx.merge(graphdef, params)
        b, p = tokens.shape
        valid, positions = _prompt_layout(tokens, lengths, p + n)
        segment_ids = valid.astype(jnp.int32)  # padding is its own segment, never attended to
        buffer = jnp.concatenate([tokens, jnp.zeros((b, n), jnp.int32)], axis=1)

        def logits_at(buffer, col):
            logits = model(buffer, segment_ids=segment_ids, positions=positions)
            return jax.lax.dynamic_index_in_dim(logits, col, axis=1, keepdims=False)

        def advance(buffer, token, i):
            buffer = jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], p + i, axis=1)
            return logits_at(buffer, p + i), buffer

        return loop(logits_at(buffer, p - 1), key, advance, buffer)

    return jax.jit(generate_cached if use_cache else generate_uncached)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Token lists -> (left-padded [B, max_len] int32, lengths [B] int32). Empty prompts are refused."""
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i}: empty after tokenization; give at least one token")
    width = max(len(p) for p in prompts)
    rows = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    return jnp.asarray(rows, jnp.int32), jnp.asarray([len(p) for p in prompts], jnp.int32)
