"""A tiny model's train state and jitted step on any mesh, for checkpoint and fault tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flaxpod.model.axes import activation_sharding
from flaxpod.sharding.mesh import batch_sharding, build_mesh, put_batch
from flaxpod.sharding.rules import activation_resolver, make_rules
from flaxpod.train.config import ModelConfig, OptimConfig
from flaxpod.train.optimizer import make_optimizer
from flaxpod.train.state import StateLayout, make_layout
from flaxpod.train.step import compile_train_step, make_train_step

MODEL = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=8, vocab_size=64)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2)
BATCH = 8


@dataclass
class Tiny:
    layout: StateLayout
    step: Any  # jitted (state, batch) -> (state, metrics)
    batch_sharding: Any
    tx: Any

    def init(self, seed: int = 0):
        """A fresh state like train.state.init_state's, made eagerly: no compilation of the
        model's initializers (slow on a busy 2-core machine), the same tree and shardings."""
        rng = np.random.default_rng(seed)
        params = jax.tree.map(
            lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), self.layout.shapes["params"]
        )
        state = {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": np.zeros((), np.int32),
            "rng": jax.random.PRNGKey(seed),
            "skipped_steps": np.zeros((), np.int32),
        }
        return jax.device_put(state, self.layout.shardings)

    def put(self, batch: dict[str, np.ndarray]):
        return put_batch(batch, self.batch_sharding)


def tiny(data: int = 1, fsdp: int = 1, tensor: int = 1, *, rules: str = "fsdp_tp") -> Tiny:
    """The tiny model on the first data*fsdp*tensor devices."""
    mesh = build_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])
    r = make_rules(rules)
    tx, schedule = make_optimizer(OPTIM, total_steps=100)
    layout = make_layout(MODEL, tx, mesh, r)
    b_sharding = batch_sharding(mesh, r)
    with activation_sharding(activation_resolver(mesh, r)):
        step = compile_train_step(make_train_step(layout, tx, schedule), layout, b_sharding)
    return Tiny(layout, step, b_sharding, tx)


def random_state(layout: StateLayout, seed: int) -> Any:
    """A train state of the layout's shapes filled with random values, made on the host: no
    compilation, so tests that only move states around stay fast."""
    rng = np.random.default_rng(seed)

    def leaf(s):
        if np.issubdtype(s.dtype, np.floating):
            return rng.standard_normal(s.shape).astype(s.dtype)
        return rng.integers(0, 1000, s.shape).astype(s.dtype)

    return jax.tree.map(leaf, layout.shapes)


def batch(seed: int, *, loss_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, MODEL.vocab_size, (BATCH, MODEL.seq_len + 1), dtype=np.int32)
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if loss_mask is not None:
        out["loss_mask"] = loss_mask
    return out


def host(tree) -> Any:
    """Every leaf as a numpy array (a copy: the device buffers may be donated afterwards)."""
    return jax.tree.map(lambda x: np.array(x), tree)


def assert_bitwise_equal(a, b) -> None:
    la, lb = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert jax.tree.structure(host(a)) == jax.tree.structure(host(b))
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()
