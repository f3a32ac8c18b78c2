"""The one trainer: mesh, rules, optimizer, state layout, batch sharding and the compiled steps, built
once for an objective. Pretraining, finetuning, benchmarks and tests all build it here; the loop that
feeds it data, checkpoints and metrics is train/loop.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import optax
from flaxpod.model.axes import activation_sharding
from flaxpod.model.layers import step_kernels
from flaxpod.model.transformer import count_params
from flaxpod.sharding.cpu_devices import cpu_compiler_options
from flaxpod.sharding.cpu_matmul import cpu_kernels
from flaxpod.sharding.mesh import batch_sharding, build_mesh, put_batch
from flaxpod.sharding.rules import Rules, activation_resolver, make_rules
from flaxpod.train.config import Config, ModelConfig, check_against_devices
from flaxpod.train.objectives import Batch, CausalLM, Objective
from flaxpod.train.optimizer import make_optimizer, trainable_mask
from flaxpod.train.state import StateLayout, TrainState, compile_once, fresh_state, init_params, make_layout
from flaxpod.train.step import make_eval_step, make_train_step
from jax.sharding import Mesh, NamedSharding


class Trainer:
    """Everything static about training one model on one mesh, and the compiled steps.

    `step(state, batch)` is the jitted pure train step (the state's buffers are donated);
    `evaluate(params, batches)` averages the objective's metrics over host batches.
    """

    def __init__(
        self,
        model: ModelConfig,
        mesh: Mesh,
        rules: Rules,
        tx: optax.GradientTransformation,
        schedule: optax.Schedule,
        objective: Objective,
        *,
        grad_accum: int = 1,
        trainable: Callable[[dict], Any] | None = None,
        matmul: str = "auto",
    ):
        self.model, self.mesh, self.rules = model, mesh, rules
        self.tx, self.schedule, self.objective = tx, schedule, objective
        self.layout: StateLayout = make_layout(model, tx, mesh, rules)
        self.batch_sharding: NamedSharding = batch_sharding(mesh, rules)
        replicated = all(s.is_fully_replicated for s in jax.tree.leaves(self.layout.param_shardings))
        self.matmul, self.attention = cpu_kernels(mesh, _axes(self.batch_sharding.spec[0]), replicated, matmul)
        # LoRA's frozen base gets no weight gradient computed: the step stops it.
        frozen_mask = None if trainable is None else jax.tree.map(lambda t: not t, trainable(self.layout.shapes.params))
        dropout = model.dropout > 0 or (model.lora.rank > 0 and model.lora.dropout > 0)
        train_step = make_train_step(
            self.layout, tx, schedule, objective, grad_accum=grad_accum, dropout=dropout, frozen=frozen_mask
        )
        self.step = jax.jit(
            self._traced_on_mesh(train_step),
            in_shardings=(self.layout.shardings, None),
            out_shardings=(self.layout.shardings, None),
            donate_argnums=(0,),
            compiler_options=cpu_compiler_options(mesh),
        )
        self._eval_step = self.compile_eval(make_eval_step(self.layout, objective))

    @classmethod
    def from_config(cls, cfg: Config, objective: Objective | None = None, *, devices: list | None = None) -> Trainer:
        """The trainer a run config asks for (mesh over all devices, or `devices`)."""
        frozen, lora = cfg.finetune.freeze, cfg.model.lora
        tx, schedule = make_optimizer(
            cfg.optim, cfg.train.steps, lr_mult=cfg.finetune.lr_mult, frozen=frozen, lora=lora
        )
        objective = objective if objective is not None else CausalLM.from_optim(cfg.optim)
        mesh, rules = mesh_from_config(cfg, devices), make_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)
        # LoRA only: a plain finetune.freeze run keeps its former step (and logged grad_norm) exactly.
        trainable = (lambda params: trainable_mask(params, frozen, lora)) if lora.rank else None
        return cls(
            cfg.model,
            mesh,
            rules,
            tx,
            schedule,
            objective,
            grad_accum=cfg.train.grad_accum,
            trainable=trainable,
            matmul=cfg.mesh.cpu_matmul,
        )

    # -- state

    def init_state(self, seed: int) -> TrainState:
        """Fresh parameters and optimizer state, created on their shards; the same seed gives the
        same values on any mesh."""
        return compile_once(lambda: fresh_state(init_params(self.model, seed), self.tx, seed), self.layout.shardings)

    def state_from_params(self, params: dict, seed: int) -> TrainState:
        """A fresh optimizer state around `params`, which may lack some entries (a new task head, LoRA
        adapters): those are initialised as `init_state(seed)` would (the rest of its random
        initialisation is dead code that XLA removes)."""

        def build(given: dict) -> TrainState:
            return fresh_state(_fill(given, init_params(self.model, seed)), self.tx, seed)

        unknown = sorted(set(params) - set(self.layout.shapes.params))
        if unknown:
            raise ValueError(f"parameters {unknown} are not part of this model")
        return compile_once(build, self.layout.shardings, params)

    def compile_eval(self, fn: Callable) -> Callable:
        """`fn(params, batch)` jitted for this mesh (activation-sharding hints installed), e.g. predictions."""
        return jax.jit(
            self._traced_on_mesh(fn),
            in_shardings=(self.layout.param_shardings, None),
            compiler_options=cpu_compiler_options(self.mesh),
        )

    def _traced_on_mesh(self, fn: Callable) -> Callable:
        """`fn` traced with the mesh's activation-sharding hints, matrix product and attention installed (jit traces
        lazily, on the first call, so they must be installed inside the traced function)."""
        resolver = activation_resolver(self.mesh, self.rules)

        def traced(*args):
            with activation_sharding(resolver), step_kernels(self.matmul, self.attention):
                return fn(*args)

        return traced

    def param_counts(self) -> tuple[int, int]:
        """(all parameters, non-embedding parameters)."""
        shapes = self.layout.shapes.params
        return count_params(shapes), count_params(shapes, exclude_embeddings=True)

    # -- batches

    def put(self, batch: dict[str, np.ndarray]) -> Batch:
        """This process's rows -> global arrays on the mesh."""
        return put_batch(batch, self.batch_sharding)

    def evaluate(self, params: dict, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
        """The objective's metrics averaged over every scored item of `batches` (host arrays)."""
        totals: dict[str, float] = {}
        weight = 0.0
        for batch in batches:
            sums, w = self._eval_step(params, self.put(batch))
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            weight += float(w)
        return {name: value / max(weight, 1.0) for name, value in totals.items()}


def _fill(given: dict, fresh: dict) -> dict:
    """`fresh` with every entry that `given` has replaced by `given`'s, recursively."""
    return {k: (_fill(given[k], v) if isinstance(v, dict) else given[k]) if k in given else v for k, v in fresh.items()}


def mesh_from_config(cfg: Config, devices: list | None = None) -> Mesh:
    """The run's (data, fsdp, tensor) mesh over all devices (or `devices`), split across slices or
    nodes as mesh.dcn_data / mesh.dcn_fsdp ask."""
    count = len(devices) if devices is not None else jax.device_count()
    shape = check_against_devices(cfg, count)
    return build_mesh(*shape, devices=devices, dcn_data=cfg.mesh.dcn_data, dcn_fsdp=cfg.mesh.dcn_fsdp)


def _axes(spec_entry: Any) -> tuple[str, ...]:
    """A PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of axis names."""
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)
