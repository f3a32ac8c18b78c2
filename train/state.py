"""The train state (params, optimizer state, step, RNG key) created directly sharded on the mesh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flaxpod.model.transformer import Transformer
from flaxpod.sharding.mesh import param_shardings, tree_shardings_like
from flaxpod.sharding.rules import Rules
from flaxpod.train.config import ModelConfig
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# state = {"params": pure dict, "opt_state": optax state, "step": int32[], "rng": uint32[2],
#          "skipped_steps": int32[] (steps whose non-finite update was not applied)}
TrainState = dict[str, Any]


@dataclass
class StateLayout:
    """Everything static about the state: the model's graph, abstract shapes and shardings."""

    graphdef: nnx.GraphDef
    shapes: TrainState
    shardings: TrainState
    param_shardings: dict


def abstract_model(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and abstract parameters (with `axes` metadata), without allocating."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    return nnx.split(model)


def _init_params(cfg: ModelConfig, seed: int) -> dict:
    with nnx.use_eager_sharding(False):
        return nnx.to_pure_dict(nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1])


def make_layout(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules) -> StateLayout:
    graphdef, abstract = abstract_model(cfg)
    p_shardings = param_shardings(abstract, mesh, rules)
    shapes = jax.eval_shape(lambda: _fresh_state(cfg, tx, 0))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {
        "params": p_shardings,
        "opt_state": tree_shardings_like(shapes["opt_state"], p_shardings, shapes["params"], mesh),
        "step": replicated,
        "rng": replicated,
        "skipped_steps": replicated,
    }
    return StateLayout(graphdef, shapes, shardings, p_shardings)


def _fresh_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = _init_params(cfg, seed)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.fold_in(jax.random.PRNGKey(seed), 1),
        "skipped_steps": jnp.zeros((), jnp.int32),
    }


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, layout: StateLayout, seed: int) -> TrainState:
    """A fresh state, each array created on its shards (never whole on one device). The same
    seed gives the same values on any mesh."""
    init = jax.jit(lambda: _fresh_state(cfg, tx, seed), out_shardings=layout.shardings)
    options = {}
    if jax.default_backend() == "cpu":
        # Runs once: XLA's CPU optimizer would spend ~0.7 s per random-number call compiling
        # code that is executed a single time (11 s -> 1.6 s for a tiny model here).
        options["xla_backend_optimization_level"] = 0
    return init.lower().compile(compiler_options=options)()
