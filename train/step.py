"""The pure train step `(state, batch) -> (state, metrics)` and the evaluation step, for any objective."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flaxpod.train.objectives import Batch, Objective
from flaxpod.train.state import StateLayout, TrainState

PREPARE_STREAM = 1  # fold_in index of the input-corruption key derived from a step's key


def keep_if(ok: jax.Array, new, old):
    """`new` where the scalar `ok` holds, else `old`, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(
    layout: StateLayout,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    objective: Objective,
    *,
    grad_accum: int = 1,
    dropout: bool = False,
    frozen: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`frozen`: a tree like the params of Python bools; frozen leaves are wrapped in stop_gradient, so
    autodiff computes no weight gradient for them (their gradient is a zero the optimizer ignores)."""
    graphdef = layout.graphdef
    prepare = getattr(objective, "prepare", None)

    def micro_loss(params, micro: Batch, total_weight, key):
        if frozen is not None:
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        loss_sum, sums = objective.loss_sums(nnx.merge(graphdef, params), micro, key)
        return loss_sum / total_weight, sums

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng, step_key = jax.random.split(state.rng)
        if prepare is not None:
            # Objectives that corrupt their input (masked LM) draw the corruption from the step's key, so it is a
            # pure function of (seed, step) and a resumed run repeats it; the fold keeps it apart from dropout's.
            batch = prepare(batch, jax.random.fold_in(step_key, PREPARE_STREAM))
        total_weight = jnp.maximum(objective.weight(batch), 1.0)
        params = state.params

        if grad_accum == 1:
            grads, sums = grad_fn(params, batch, total_weight, step_key if dropout else None)
        else:
            # Micro-batch a takes rows a, a+A, a+2A, ...: each device's block of rows holds
            # its share of every micro-batch, so the split moves no data between devices.
            def split(x):
                return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

            micro_batches = jax.tree.map(split, batch)

            def body(carry, xs):
                micro, index = xs
                key = jax.random.fold_in(step_key, index) if dropout else None
                g, s = grad_fn(params, micro, total_weight, key)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero_sums = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches), 1.0, None))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)
            (grads, sums), _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(grad_accum)))

        metrics = {name: value / total_weight for name, value in sums.items()}
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        # A non-finite loss or gradient must never reach the parameters: keep the old params and
        # optimizer state with a select (no branch, no host sync); the loop applies train.nonfinite.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        skipped = state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
        new_state = TrainState(
            params=keep_if(finite, optax.apply_updates(params, updates), params),
            opt_state=keep_if(finite, opt_state, state.opt_state),
            step=state.step + 1,
            rng=rng,
            skipped_steps=skipped,
        )
        metrics.update(grad_norm=grad_norm, lr=schedule(state.step), skipped_steps=skipped)
        return new_state, metrics

    return step


def make_eval_step(layout: StateLayout, objective: Objective) -> Callable[[dict, Batch], tuple[dict, jax.Array]]:
    """(params, batch) -> ({metric: sum over the batch}, the batch's weight). An objective that corrupts its
    input does it with its fixed evaluation key (key None), so evaluations are comparable across steps."""
    prepare = getattr(objective, "prepare", None)

    def eval_step(params, batch):
        if prepare is not None:
            batch = prepare(batch, None)
        _, sums = objective.loss_sums(nnx.merge(layout.graphdef, params), batch, None)
        return sums, objective.weight(batch)

    return eval_step
