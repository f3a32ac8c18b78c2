"""The chunked causal-LM loss (optim.loss_chunk) against the plain one: same loss, same gradient, same step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flaxpod.model.transformer import Transformer
from flaxpod.sharding.mesh import build_mesh
from flaxpod.sharding.rules import make_rules
from flaxpod.train.config import ConfigError, ModelConfig, OptimConfig, load_config
from flaxpod.train.objectives import CausalLM
from flaxpod.train.optimizer import make_optimizer
from flaxpod.train.trainer import Trainer

T, VOCAB, ROWS = 10, 96, 3  # T = 10 is not a multiple of the chunk (4): the last chunk is padded


def tiny_model(tie: bool) -> ModelConfig:
    return ModelConfig(
        family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=T, vocab_size=VOCAB, tie_embeddings=tie
    )


def packed_batch(seed: int, rows: int = ROWS) -> dict[str, np.ndarray]:
    """Rows of two documents each (positions restart), a random loss mask: every input the loss reads."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, T + 1), dtype=np.int32)
    split = 4
    segment_ids = np.where(np.arange(T) < split, 1, 2).astype(np.int32)[None].repeat(rows, 0)
    positions = np.where(np.arange(T) < split, np.arange(T), np.arange(T) - split).astype(np.int32)[None]
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions.repeat(rows, 0),
        "loss_mask": (rng.random((rows, T)) < 0.7).astype(np.float32),
    }


def mean_loss_and_grads(objective: CausalLM, graphdef, params, batch):
    def mean_objective(p):
        total, sums = objective.loss_sums(nnx.merge(graphdef, p), batch, None)
        return total / objective.weight(batch), sums["loss"] / objective.weight(batch)

    (objective_value, ce), grads = jax.jit(jax.value_and_grad(mean_objective, has_aux=True))(params)
    return float(objective_value), float(ce), grads


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_and_gradient_equal_the_plain_ones(tie):
    """float32; z-loss on, loss mask, packed documents, T % chunk != 0. Tolerance: max abs difference 1e-6
    for the mean loss and for every gradient entry (the gradients are O(1e-2))."""
    graphdef, params = nnx.split(Transformer(tiny_model(tie), rngs=nnx.Rngs(0)))
    batch = {k: jnp.asarray(v) for k, v in packed_batch(0).items()}
    plain = mean_loss_and_grads(CausalLM(z_loss=1e-2), graphdef, params, batch)
    chunked = mean_loss_and_grads(CausalLM(z_loss=1e-2, loss_chunk=4), graphdef, params, batch)
    assert plain[0] > plain[1] > 0  # the z-loss term is there
    assert abs(plain[0] - chunked[0]) <= 1e-6 and abs(plain[1] - chunked[1]) <= 1e-6
    leaves = jax.tree_util.tree_leaves_with_path(plain[2])
    chunked_leaves = jax.tree.leaves(chunked[2])
    assert len(leaves) == len(chunked_leaves) > 0
    for (path, g), h in zip(leaves, chunked_leaves, strict=True):
        diff = float(jnp.max(jnp.abs(g - h)))
        assert diff <= 1e-6, f"{jax.tree_util.keystr(path)}: max |plain - chunked| = {diff}"
    assert float(jnp.max(jnp.abs(plain[2]["embed"]))) > 1e-4  # a real gradient, not zeros on both sides


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_one_trainer_step_is_the_same_with_chunks(mesh_shape):
    """On one device, and on a data x fsdp x tensor mesh (the vocabulary of each chunk's logits sharded)."""
    model = tiny_model(tie=True)
    mesh = build_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    # Adam's eps well above the smallest gradients: with the default 1e-8, an element whose gradient is ~1e-8
    # moves by lr * g / (|g| + eps), whose slope there (lr / 4 eps) turned a 1e-10 difference in summation
    # order into a 2e-5 difference in the parameter (seen on an AVX-512 machine); the gradients themselves
    # are compared at 1e-6 above.
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-4), total_steps=10)
    trainers = [Trainer(model, mesh, make_rules("fsdp_tp"), tx, schedule, CausalLM(1e-3, chunk)) for chunk in (0, 3)]
    batch = packed_batch(1, rows=4)
    results = []
    for trainer in trainers:
        state, metrics = trainer.step(trainer.init_state(seed=0), trainer.put(batch))
        results.append((float(metrics["loss"]), jax.tree.map(np.asarray, jax.device_get(state.params))))
    (loss_a, params_a), (loss_b, params_b) = results
    assert abs(loss_a - loss_b) <= 1e-6
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_config_key_reaches_the_trainer_objective():
    cfg = load_config(None, ["model.vocab_size=64", "model.n_layer=1", "model.d_model=16", "optim.loss_chunk=8"])
    assert Trainer.from_config(cfg, devices=jax.devices()[:1]).objective.loss_chunk == 8
    with pytest.raises(ConfigError, match="optim.loss_chunk: must be >= 0, got -1"):
        load_config(None, ["optim.loss_chunk=-1"])
