"""A tiny model's train state and jitted step on any mesh, for checkpoint and fault tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flaxpod.sharding.mesh import build_mesh
from flaxpod.sharding.rules import make_rules
from flaxpod.train.config import ModelConfig, OptimConfig
from flaxpod.train.objectives import CausalLM
from flaxpod.train.optimizer import make_optimizer
from flaxpod.train.state import StateLayout, TrainState
from flaxpod.train.trainer import Trainer

MODEL = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=8, vocab_size=64)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2)
BATCH = 8


@dataclass
class Tiny:
    trainer: Trainer

    @property
    def layout(self) -> StateLayout:
        return self.trainer.layout

    @property
    def step(self):  # jitted (state, batch) -> (state, metrics)
        return self.trainer.step

    def init(self, seed: int = 0) -> TrainState:
        """A fresh state like Trainer.init_state's, made eagerly: no compilation of the
        model's initializers (slow on a busy 2-core machine), the same tree and shardings."""
        rng = np.random.default_rng(seed)
        params = jax.tree.map(
            lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), self.layout.shapes.params
        )
        state = TrainState(
            params=params,
            opt_state=self.trainer.tx.init(params),
            step=np.zeros((), np.int32),
            rng=jax.random.PRNGKey(seed),
            skipped_steps=np.zeros((), np.int32),
        )
        return jax.device_put(state, self.layout.shardings)

    def put(self, batch: dict[str, np.ndarray]):
        return self.trainer.put(batch)


def tiny(data: int = 1, fsdp: int = 1, tensor: int = 1, *, rules: str = "fsdp_tp") -> Tiny:
    """The tiny model on the first data*fsdp*tensor devices."""
    mesh = build_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])
    tx, schedule = make_optimizer(OPTIM, total_steps=100)
    return Tiny(Trainer(MODEL, mesh, make_rules(rules), tx, schedule, CausalLM()))


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
