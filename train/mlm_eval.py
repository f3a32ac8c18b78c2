"""Evaluating masked-LM (encoder) runs: masked-token loss/accuracy on text with a fixed masking seed,
pseudo-log-likelihood, and the top-k fills of [MASK] tokens.

Masked-token metrics: the token stream (documents joined as in training) is cut into windows of
seq_len tokens (the last one padded, padding in segment 0 so no token attends to it), masked once
with `jax.random.key(EVAL_MASK_SEED)` over the whole [windows, seq_len] array with the run's mlm
settings, and scored on the selected tokens. The masking depends only on the seed and the text,
not on the batch size or the mesh, so figures compare across runs and checkpoints.

Pseudo-log-likelihood (Salazar et al. 2020): each token is masked on its own and scored given all
the others in its window; pll = mean log p per token (nats), pseudo_perplexity = exp(-pll). It
costs one forward pass per token (seq_len passes per window, batched): the slow path, for short
texts; `--limit` caps the windows it scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flaxpod.model.errors import InputError
from flaxpod.train.mlm import EVAL_MASK_SEED, MaskedLM, mask_token_id, special_token_ids
from flaxpod.train.objectives import lm_logits, token_losses


def require_mlm(run, what: str) -> None:
    if run.cfg.train.objective != "mlm":
        raise InputError(f"{run.run_dir}: {what} needs a masked-LM run (train.objective=mlm), this one is causal")


def masked_objective(run) -> MaskedLM:
    tok = run.tokenizer
    return MaskedLM(mask_token_id(tok), special_token_ids(tok), tok.vocab_size, run.cfg.model.vocab_size, run.cfg.mlm)


def windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, segment_ids) [W, seq_len]: consecutive windows, the last one zero-padded (segment 0)."""
    count = -(-len(tokens) // seq_len)
    inputs = np.zeros((count, seq_len), np.int32)
    segments = np.zeros((count, seq_len), np.int32)
    for w in range(count):
        chunk = tokens[w * seq_len : (w + 1) * seq_len]
        inputs[w, : len(chunk)], segments[w, : len(chunk)] = chunk, 1
    return inputs, segments


def _row_sums(run):
    """jitted (params, batch) -> per-row (cross-entropy sum, correct count) over batch['loss_mask']."""
    graphdef = run.graphdef

    def fn(params, batch):
        logits = lm_logits(nnx.merge(graphdef, params), batch, None)
        ce, _ = token_losses(logits, batch["targets"])
        w = batch["loss_mask"].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        return jnp.sum(ce * w, -1), jnp.sum(correct * w, -1)

    return jax.jit(fn)


def _score(run, batch: dict[str, np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    fn = _row_sums(run)
    ce, correct = [], []
    for start in range(0, len(batch["inputs"]), batch_size):
        part = {k: v[start : start + batch_size] for k, v in batch.items()}
        c, a = fn(run.params, part)
        ce.append(np.asarray(c, np.float64))
        correct.append(np.asarray(a, np.float64))
    return np.concatenate(ce), np.concatenate(correct)


def masked_lm_metrics(run, tokens: np.ndarray, seq_len: int, batch_size: int = 32) -> dict[str, float]:
    """Masked-token loss (nats), accuracy and count on `tokens`, masked with the fixed evaluation seed."""
    inputs, segments = windows(tokens, seq_len)
    masked = masked_objective(run).prepare(
        {"inputs": jnp.asarray(inputs), "segment_ids": jnp.asarray(segments)}, jax.random.key(EVAL_MASK_SEED)
    )
    batch = {k: np.asarray(v) for k, v in masked.items()}
    ce, correct = _score(run, batch, batch_size)
    count = float(batch["loss_mask"].sum())
    if count == 0:
        raise ValueError("text too short to evaluate: no token was selected for masking")
    return {
        "masked_loss": float(ce.sum()) / count,
        "masked_accuracy": float(correct.sum()) / count,
        "masked_tokens": int(count),
        "mask_seed": EVAL_MASK_SEED,
    }


def pseudo_log_likelihood(
    run, tokens: np.ndarray, seq_len: int, batch_size: int = 32, limit: int | None = None
) -> dict[str, float]:
    """Mean log p(token | every other token of its window) with that token masked (one pass per token)."""
    mask_id = mask_token_id(run.tokenizer)
    special = set(special_token_ids(run.tokenizer))
    inputs, segments = windows(tokens, seq_len)
    if limit is not None:
        inputs, segments = inputs[:limit], segments[:limit]
    rows: dict[str, list[np.ndarray]] = {"inputs": [], "targets": [], "segment_ids": [], "loss_mask": []}
    for x, seg in zip(inputs, segments, strict=True):
        for t in np.flatnonzero((seg > 0) & ~np.isin(x, list(special))):
            corrupted = x.copy()
            corrupted[t] = mask_id
            only_t = np.zeros(seq_len, np.float32)
            only_t[t] = 1.0
            for key, value in (("inputs", corrupted), ("targets", x), ("segment_ids", seg), ("loss_mask", only_t)):
                rows[key].append(value)
    if not rows["inputs"]:
        raise ValueError("text too short to evaluate: no scorable token")
    ce, _ = _score(run, {k: np.stack(v) for k, v in rows.items()}, batch_size)
    pll = -float(ce.mean())
    return {"pll": pll, "pseudo_perplexity": math.exp(-pll), "tokens": len(ce)}


def fill_mask(run, texts: list[str], top_k: int = 5) -> list[list[list[tuple[str, float]]]]:
    """For each text, for each [MASK] in it: the top_k (piece, probability) fills, best first."""
    mask_id = mask_token_id(run.tokenizer)
    vocab = run.tokenizer.vocab_size
    model = nnx.merge(run.graphdef, run.params)
    out = []
    for i, text in enumerate(texts):
        # Pieces carry their leading space (" king"), and training masks whole pieces: so the space before a
        # [MASK] belongs to the masked word, not to a separate " " piece the model never saw before a mask.
        ids = run.tokenizer.encode(text.replace(" [MASK]", "[MASK]"))
        where = [t for t, token in enumerate(ids) if token == mask_id]
        if not where:
            raise InputError(f"text {i + 1}: no [MASK] token in {text!r}")
        if len(ids) > run.cfg.model.max_len:
            raise InputError(f"text {i + 1}: {len(ids)} tokens exceed the model's {run.cfg.model.max_len}")
        logits = np.asarray(model(jnp.asarray([ids], jnp.int32)))[0, :, :vocab]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        fills = []
        for t in where:
            best = np.argsort(-probs[t])[:top_k]
            fills.append([(run.tokenizer.decode([int(b)]), float(probs[t, b])) for b in best])
        out.append(fills)
    return out
