"""Masked-LM pretraining (BERT-style): the objective that masks a copy of each batch on device.

`train.objective=mlm` makes the model bidirectional within a document (`model.bidirectional`, segment ids
keep packed documents apart as for causal runs) and trains it to recover the `mlm.mask_prob` selected
tokens: of those, `mlm.mask_fraction` become [MASK], `mlm.random_fraction` a random token, the rest stay.
Masking runs inside the jitted step from the step's key (train/step.py `prepare`), so it is a pure
function of (seed, step, row): resuming repeats it exactly, and it costs no host time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flaxpod.data.tokenizer import MASK_TOKEN, Tokenizer
from flaxpod.model.errors import ConfigError
from flaxpod.train.config import Config, MlmConfig
from flaxpod.train.objectives import Batch, CausalLM, Objective, lm_logits, loss_weights, token_losses

# Evaluation masks every batch with this fixed key, so val_* and `flaxpod evaluate` figures compare across
# checkpoints and runs (stated in the README and in evaluate's output).
EVAL_MASK_SEED = 0


def mask_token_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's [MASK] id; a tokenizer without it (e.g. one given by the user) is refused."""
    token_id = getattr(tokenizer, "token_id", None)
    i = token_id(MASK_TOKEN) if token_id is not None else None
    if i is None:
        raise ConfigError(
            f"tokenizer: train.objective=mlm needs a {MASK_TOKEN} token, which this {tokenizer.kind} tokenizer "
            f"lacks; let flaxpod train a sentencepiece tokenizer (leave tokenizer.path empty)"
        )
    return i


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids never selected for masking: control, unknown and user-defined pieces (pad, bos, eos, [MASK])."""
    listed = getattr(tokenizer, "special_ids", None)
    ids = set(listed()) if listed is not None else set()
    ids.update(i for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) if i is not None)
    return sorted(ids)


class MaskedLM:
    """Cross entropy and accuracy on the selected tokens of a masked copy of the batch's inputs."""

    def __init__(self, mask_id: int, special_ids: list[int], text_vocab: int, model_vocab: int, mlm: MlmConfig):
        self.mask_id, self.text_vocab, self.mlm = mask_id, text_vocab, mlm
        special = np.zeros(model_vocab, bool)
        special[np.asarray(special_ids, int)] = True
        self.special = special  # numpy: a constant of the compiled step, not a traced argument

    def prepare(self, batch: Batch, key: jax.Array | None) -> Batch:
        """inputs -> (corrupted inputs, targets = the original tokens, loss_mask = the selected tokens)."""
        if key is None:
            key = jax.random.key(EVAL_MASK_SEED)
        tokens = batch["inputs"]
        select_key, action_key, random_key = jax.random.split(key, 3)
        eligible = ~jnp.asarray(self.special)[tokens]
        if "segment_ids" in batch:
            eligible &= batch["segment_ids"] > 0
        selected = eligible & (jax.random.uniform(select_key, tokens.shape) < self.mlm.mask_prob)
        action = jax.random.uniform(action_key, tokens.shape)
        random_tokens = jax.random.randint(random_key, tokens.shape, 0, self.text_vocab, tokens.dtype)
        corrupted = jnp.where(action < self.mlm.mask_fraction, self.mask_id, tokens)
        corrupted = jnp.where(
            (action >= self.mlm.mask_fraction) & (action < self.mlm.mask_fraction + self.mlm.random_fraction),
            random_tokens,
            corrupted,
        )
        out = {k: v for k, v in batch.items() if k in ("segment_ids", "positions")}
        out.update(inputs=jnp.where(selected, corrupted, tokens), targets=tokens, loss_mask=selected)
        return out

    def weight(self, batch: Batch) -> jax.Array:
        return jnp.sum(loss_weights(batch))

    def loss_sums(self, model, batch, dropout_key):
        logits = lm_logits(model, batch, dropout_key)
        ce, _ = token_losses(logits, batch["targets"])
        w = loss_weights(batch)
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        ce_sum = jnp.sum(ce * w)
        return ce_sum, {"loss": ce_sum, "accuracy": jnp.sum(correct * w)}


def with_objective_model(cfg: Config) -> Config:
    """The config with the model the objective needs: bidirectional attention for mlm, and classification
    pooling `mean` instead of the causal default `last` (an encoder's last token is no summary of the row)."""
    if cfg.train.objective != "mlm" or cfg.model.bidirectional:
        return cfg
    pooling = "mean" if cfg.model.pooling == "last" else cfg.model.pooling
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, bidirectional=True, pooling=pooling))


def pretraining_objective(cfg: Config, tokenizer: Tokenizer) -> Objective:
    """The loss `train.objective` names, built for this tokenizer and (resolved) model."""
    if cfg.train.objective == "causal":
        return CausalLM.from_optim(cfg.optim)
    return MaskedLM(
        mask_token_id(tokenizer), special_token_ids(tokenizer), tokenizer.vocab_size, cfg.model.vocab_size, cfg.mlm
    )
