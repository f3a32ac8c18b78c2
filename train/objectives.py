"""Training objectives: what a batch's loss is. One train step (train/step.py) serves them all.

An objective turns (model, batch) into sums over the batch's scored items (tokens for language
modelling, examples for classification) and says how many items the batch scores. The step
divides by the whole batch's count, so gradient accumulation over micro-batches gives exactly the
big-batch gradient whatever the objective.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from flaxpod.model import axes as ax
from flaxpod.model.axes import constrain
from flaxpod.model.transformer import vocab_logits

Batch = dict[str, jax.Array]


class Objective(Protocol):
    """`loss_sums` returns (the sum to minimise, {metric: sum}); metrics are divided by `weight`."""

    def weight(self, batch: Batch) -> jax.Array: ...

    def loss_sums(
        self, model: nnx.Module, batch: Batch, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def loss_weights(batch: Batch) -> jax.Array:
    """Per-target weights: the batch's `loss_mask` (response-only SFT, poisoned tests), else ones."""
    mask = batch.get("loss_mask")
    return jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy and log-partition (for z-loss), in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def document_inputs(batch: Batch) -> dict[str, jax.Array | None]:
    """The model's keyword inputs that describe packed documents: segment ids and positions (None when
    the batch has one document per row)."""
    return {"segment_ids": batch.get("segment_ids"), "positions": batch.get("positions")}


def lm_logits(model: nnx.Module, batch: Batch, dropout_key: jax.Array | None) -> jax.Array:
    return model(batch["inputs"], **document_inputs(batch), dropout_key=dropout_key)


def forward(graphdef: nnx.GraphDef, params: dict, batch: Batch, dropout_key: jax.Array | None = None) -> jax.Array:
    """Language-model logits of pure parameters (for code that holds a graphdef and params)."""
    return lm_logits(nnx.merge(graphdef, params), batch, dropout_key)


def chunked_token_losses(model: nnx.Module, batch: Batch, dropout_key: jax.Array | None, chunk: int):
    """`token_losses` of the model's logits without ever holding all of them: the hidden states are
    projected onto the vocabulary `chunk` sequence positions at a time (a `lax.map` over chunks), and each
    chunk is rematerialised in the backward pass (`jax.checkpoint`), so at most one [B, chunk, V] block of
    float32 logits is alive instead of [B, T, V]. A sequence that `chunk` does not divide is padded with
    zero hidden states whose losses are cut off again (their gradient is zero)."""
    x = model.hidden(batch["inputs"], **document_inputs(batch), dropout_key=dropout_key)
    b, t, d = x.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = jnp.pad(batch["targets"], ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    # The float32 head goes into the loop (cast per chunk inside vocab_logits), so its gradient is summed over
    # chunks in float32, not in the compute dtype.
    head = model.head_matrix()

    @jax.checkpoint
    def one_chunk(head: jax.Array, x_chunk: jax.Array, t_chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = constrain(vocab_logits(x_chunk, head), (ax.BATCH, None, ax.ACT_VOCAB))
        return token_losses(logits, t_chunk)

    ce, log_z = jax.lax.map(lambda chunk_in: one_chunk(head, *chunk_in), (xs, ts))

    def unchunk(a: jax.Array) -> jax.Array:
        return a.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]

    return unchunk(ce), unchunk(log_z)


class CausalLM:
    """Next-token cross entropy on the targets the loss mask selects, plus an optional z-loss
    (log Z)^2 that keeps logits from drifting. Pretraining and SFT (a response-only mask).

    `loss_chunk` > 0 computes the loss that many sequence positions at a time (`chunked_token_losses`),
    never materialising the [B, T, vocab] float32 logits; 0 projects the whole sequence at once."""

    def __init__(self, z_loss: float = 0.0, loss_chunk: int = 0):
        if loss_chunk < 0:
            raise ValueError(f"loss_chunk: expected >= 0 sequence positions, got {loss_chunk}")
        self.z_loss, self.loss_chunk = z_loss, loss_chunk

    @classmethod
    def from_optim(cls, optim) -> CausalLM:
        """The causal LM loss that `optim` (train.config.OptimConfig: z_loss, loss_chunk) configures."""
        return cls(optim.z_loss, optim.loss_chunk)

    def weight(self, batch: Batch) -> jax.Array:
        return jnp.sum(loss_weights(batch))

    def loss_sums(self, model, batch, dropout_key):
        if self.loss_chunk:
            ce, log_z = chunked_token_losses(model, batch, dropout_key, self.loss_chunk)
        else:
            ce, log_z = token_losses(lm_logits(model, batch, dropout_key), batch["targets"])
        w = loss_weights(batch)
        ce_sum = jnp.sum(ce * w)
        objective = ce_sum + self.z_loss * jnp.sum(jnp.square(log_z) * w) if self.z_loss else ce_sum
        return objective, {"loss": ce_sum}


def class_logits(model: nnx.Module, batch: Batch, dropout_key: jax.Array | None) -> jax.Array:
    # segment ids are required here (the head pools each row's example by them), hence not document_inputs
    return model.classify(
        batch["inputs"], segment_ids=batch["segment_ids"], positions=batch.get("positions"), dropout_key=dropout_key
    )


class Classify:
    """Cross entropy of one label per row (`labels`, -1 on padding rows), optionally weighted per
    class; the loss is sum(w[y] * ce) / sum(w[y]), as torch's CrossEntropyLoss(weight=...) does."""

    def __init__(self, class_weights: jax.Array | None = None):
        self.class_weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

    def _row_weights(self, labels: jax.Array) -> jax.Array:
        valid = (labels >= 0).astype(jnp.float32)
        if self.class_weights is None:
            return valid
        return valid * self.class_weights[jnp.maximum(labels, 0)]

    def weight(self, batch: Batch) -> jax.Array:
        return jnp.sum(self._row_weights(batch["labels"]))

    def loss_sums(self, model, batch, dropout_key):
        labels = batch["labels"]
        ce, _ = token_losses(class_logits(model, batch, dropout_key), jnp.maximum(labels, 0))
        return jnp.sum(ce * self._row_weights(labels)), {"loss": jnp.sum(ce * self._row_weights(labels))}
