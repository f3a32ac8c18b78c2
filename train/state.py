"""The train state (params, optimizer state, step, RNG key) and its layout on a mesh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from flaxpod.model.transformer import Transformer
from flaxpod.sharding.mesh import param_shardings
from flaxpod.sharding.rules import Rules
from flaxpod.train.config import ModelConfig
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a pytree, so it is jitted, sharded and donated whole.

    On disk (train/checkpoint.py) `params` is one Orbax item and the other fields together are
    the `train_state` item, {opt_state, step, rng, skipped_steps}: the layout every flaxpod
    checkpoint has had, so runs written before this class existed still resume.
    """

    params: dict
    opt_state: Any
    step: jax.Array  # int32[]: optimizer steps taken (also the schedule's step)
    rng: jax.Array  # uint32[2]: split inside the step (dropout), so a resumed run draws the same keys
    skipped_steps: jax.Array  # int32[]: steps whose non-finite update was not applied

    def rest(self) -> dict[str, Any]:
        """Everything but the parameters, as saved in the `train_state` checkpoint item."""
        return {"opt_state": self.opt_state, "step": self.step, "rng": self.rng, "skipped_steps": self.skipped_steps}


@dataclass
class StateLayout:
    """Everything static about the state: the model's graph, abstract shapes and shardings."""

    graphdef: nnx.GraphDef
    shapes: TrainState  # of jax.ShapeDtypeStruct
    shardings: TrainState  # of NamedSharding

    @property
    def param_shardings(self) -> dict:
        return self.shardings.params


def abstract_model(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and abstract parameters (with `axes` metadata), without allocating."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    return nnx.split(model)


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """Freshly initialised parameters as a pure dict (trace it under jit to place it on a mesh)."""
    with nnx.use_eager_sharding(False):
        return nnx.to_pure_dict(nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1])


def fresh_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1),
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def make_layout(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules) -> StateLayout:
    graphdef, abstract = abstract_model(cfg)
    p_shardings = param_shardings(abstract, mesh, rules)
    shapes = jax.eval_shape(lambda: fresh_state(init_params(cfg, 0), tx, 0))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = opt_state_shardings(shapes.opt_state, p_shardings, shapes.params, replicated)
    shardings = TrainState(
        params=p_shardings, opt_state=opt_shardings, step=replicated, rng=replicated, skipped_steps=replicated
    )
    return StateLayout(graphdef, shapes, shardings)


def opt_state_shardings(opt_state: Any, p_shardings: dict, p_shapes: dict, replicated: NamedSharding) -> Any:
    """Optimizer moments are sharded like their parameters: a leaf whose key path ends with a
    parameter's path and has its shape gets that parameter's sharding; counts and scalars are
    replicated.

    Why not `optax.tree_map_params`: it finds parameter trees in the state only where the whole
    tree appears; finetuning's per-group optimizers (multi_transform, frozen groups) hold partial,
    masked copies, which it cannot map."""
    by_path = {}
    flat_shardings = jax.tree_util.tree_flatten_with_path(p_shardings)[0]
    for (path, sharding), shape in zip(flat_shardings, jax.tree.leaves(p_shapes), strict=True):
        by_path[_key_names(path)] = (sharding, tuple(shape.shape))

    def pick(path, leaf):
        names = _key_names(path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit and hit[1] == tuple(getattr(leaf, "shape", ())):
                return hit[0]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _key_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def compile_once(fn, out_shardings, *args) -> Any:
    """`fn(*args)` jitted onto `out_shardings` and run: each array is created on its shards (never whole
    on one device)."""
    options = {}
    if jax.default_backend() == "cpu":
        # Runs once: XLA's CPU optimizer would spend ~0.7 s per random-number call compiling
        # code that is executed a single time (11 s -> 1.6 s for a tiny model here).
        options["xla_backend_optimization_level"] = 0
    return jax.jit(fn, out_shardings=out_shardings).lower(*args).compile(compiler_options=options)(*args)
