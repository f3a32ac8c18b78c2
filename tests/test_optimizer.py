"""The weight-decay mask on a real model's parameter tree, and that AdamW applies it."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from flaxpod.model.transformer import Transformer
from flaxpod.train.config import ModelConfig, OptimConfig
from flaxpod.train.optimizer import decay_mask, make_optimizer

# Every leaf of each family's tree, by its path: matrices and embeddings decay; norm scales and biases do not.
DECAYED = {
    "gpt2": {"embed", "pos_embed", "lm_head", "blocks/attn/q", "blocks/attn/k", "blocks/attn/v", "blocks/attn/o",
             "blocks/mlp/up", "blocks/mlp/down"},
    "llama": {"embed", "lm_head", "blocks/attn/q", "blocks/attn/k", "blocks/attn/v", "blocks/attn/o",
              "blocks/mlp/up", "blocks/mlp/gate", "blocks/mlp/down"},
}  # fmt: skip
NOT_DECAYED = {
    "gpt2": {"final_norm/scale", "final_norm/bias", "blocks/attn_norm/scale", "blocks/attn_norm/bias",
             "blocks/mlp_norm/scale", "blocks/mlp_norm/bias", "blocks/attn/q_bias", "blocks/attn/k_bias",
             "blocks/attn/v_bias", "blocks/attn/o_bias", "blocks/mlp/up_bias", "blocks/mlp/down_bias"},
    "llama": {"final_norm/scale", "blocks/attn_norm/scale", "blocks/mlp_norm/scale"},
}  # fmt: skip


def _params(family: str) -> dict:
    cfg = ModelConfig(family=family, n_layer=2, n_head=2, d_model=16, seq_len=8, vocab_size=32, tie_embeddings=False)
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))


def _by_path(tree) -> dict[str, object]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mask_decays_matrices_and_embeddings_only(family):
    mask = _by_path(decay_mask(_params(family)))
    assert {k for k, v in mask.items() if v} == DECAYED[family]
    assert {k for k, v in mask.items() if not v} == NOT_DECAYED[family]


def test_adamw_shrinks_only_masked_leaves():
    """With zero gradients Adam's update is 0, so one step leaves exactly the decoupled decay,
    p <- p * (1 - lr * weight_decay), on decayed leaves and nothing on the others."""
    params = _params("gpt2")
    optim = OptimConfig(lr=0.5, weight_decay=0.1, warmup_steps=0, schedule="constant", grad_clip=1.0)
    tx, _ = make_optimizer(optim, total_steps=10)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = _by_path(jax.tree.map(lambda p, u: p + u, params, updates))
    old = _by_path(params)
    for name in DECAYED["gpt2"]:
        np.testing.assert_allclose(new[name], np.asarray(old[name]) * (1 - 0.5 * 0.1), rtol=1e-6, err_msg=name)
    for name in NOT_DECAYED["gpt2"]:
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
