"""Sharded training equals one device: losses, gradients and parameters on several meshes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flaxpod.sharding.mesh import build_mesh, sharding_table
from flaxpod.sharding.rules import logical_to_spec, make_rules
from flaxpod.train.config import ModelConfig, OptimConfig
from flaxpod.train.objectives import CausalLM
from flaxpod.train.optimizer import make_optimizer
from flaxpod.train.state import make_layout
from flaxpod.train.trainer import Trainer

CFG = ModelConfig(
    family="llama",
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    d_model=32,
    d_ff=128,  # the shard-shape check below assumes it
    seq_len=16,
    vocab_size=128,
    tie_embeddings=False,
)
RNG = np.random.default_rng(0)
BATCHES = [
    {
        "inputs": RNG.integers(0, 128, (16, 16)).astype(np.int32),
        "targets": RNG.integers(0, 128, (16, 16)).astype(np.int32),
    }
    for _ in range(3)
]


def train(mesh_shape, *, grad_accum=1, rules="fsdp_tp", cfg=CFG):
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=1, lr=1e-2), 10)
    mesh = build_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    trainer = Trainer(cfg, mesh, make_rules(rules), tx, schedule, CausalLM(), grad_accum=grad_accum)
    state = trainer.init_state(seed=0)
    losses, norms = [], []
    for batch in BATCHES:
        state, metrics = trainer.step(state, trainer.put(batch))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    params = jax.tree.map(np.asarray, state.params)
    return np.array(losses), np.array(norms), params, trainer.layout


@pytest.fixture(scope="module")
def reference():
    return train((1, 1, 1))


@pytest.mark.parametrize(
    "mesh_shape, rules",
    [((8, 1, 1), "dp"), ((1, 4, 2), "fsdp_tp"), ((2, 2, 2), "fsdp_tp"), ((1, 8, 1), "fsdp")],
)
def test_mesh_matches_one_device(reference, mesh_shape, rules):
    ref_losses, ref_norms, ref_params, _ = reference
    losses, norms, params, layout = train(mesh_shape, rules=rules)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)  # the gradients agree
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The parameters really are split: on (1,4,2) the MLP weight lives in 8 pieces.
    if mesh_shape == (1, 4, 2):
        up = layout.param_shardings["blocks"]["mlp"]["up"]
        assert up.shard_shape((2, 32, 128)) == (2, 8, 64)


def test_grad_accumulation_equals_big_batch(reference):
    ref_losses, _, ref_params, _ = reference
    losses, _, params, _ = train((2, 2, 2), grad_accum=4)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rules_and_table():
    mesh = build_mesh(1, 4, 2)
    rules = make_rules("fsdp_tp", {"vocab": None, "mlp": ["fsdp", "tensor"]})
    assert logical_to_spec(("vocab", "embed"), rules, mesh) == jax.sharding.PartitionSpec(None, "fsdp")
    # an axis already used by an earlier dimension is not used twice
    assert logical_to_spec(("embed", "mlp"), rules, mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    # a dimension the mesh axes do not divide stays whole
    assert logical_to_spec(("embed",), rules, mesh, shape=(6,)) == jax.sharding.PartitionSpec(None)
    with pytest.raises(ValueError, match="mesh.rule_overrides.mlp: unknown mesh axis 'model'"):
        make_rules("fsdp", {"mlp": "model"})
    tx, _ = make_optimizer(OptimConfig(), 10)
    layout = make_layout(CFG, tx, mesh, make_rules("fsdp_tp"))
    table = sharding_table(layout.shapes.params, layout.param_shardings)
    assert "blocks/mlp/up" in table and "P(None, 'fsdp', 'tensor')" in table
    # optimizer moments are split like their parameters
    mu = layout.shardings.opt_state[1][0].mu["blocks"]["mlp"]["up"]
    assert mu == layout.param_shardings["blocks"]["mlp"]["up"]
