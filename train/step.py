"""The pure train step `(state, batch) -> (state, metrics)` and the evaluation step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flaxpod.train.state import StateLayout, TrainState

Batch = dict[str, jax.Array]


def forward(graphdef: nnx.GraphDef, params: dict, batch: Batch, dropout_key=None) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model(
        batch["inputs"],
        segment_ids=batch.get("segment_ids"),
        positions=batch.get("positions"),
        dropout_key=dropout_key,
    )


def loss_weights(batch: Batch) -> jax.Array:
    mask = batch.get("loss_mask")
    return jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy and log-partition (for z-loss), in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def keep_if(ok: jax.Array, new, old):
    """`new` where the scalar `ok` holds, else `old`, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(
    layout: StateLayout,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum: int = 1,
    z_loss: float = 0.0,
    dropout: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    graphdef = layout.graphdef

    def micro_loss(params, micro: Batch, total_weight, key):
        logits = forward(graphdef, params, micro, key)
        ce, log_z = token_losses(logits, micro["targets"])
        w = loss_weights(micro)
        ce_sum = jnp.sum(ce * w)
        objective = ce_sum + z_loss * jnp.sum(jnp.square(log_z) * w)
        return objective / total_weight, ce_sum

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng, step_key = jax.random.split(state["rng"])
        total_weight = jnp.maximum(jnp.sum(loss_weights(batch)), 1.0)
        params = state["params"]

        if grad_accum == 1:
            key = step_key if dropout else None
            grads, ce_sum = grad_fn(params, batch, total_weight, key)
        else:
            # Micro-batch a takes rows a, a+A, a+2A, ...: each device's block of rows holds
            # its share of every micro-batch, so the split moves no data between devices.
            def split(x):
                return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

            micro_batches = jax.tree.map(split, batch)

            def body(carry, xs):
                grads_acc, ce_acc = carry
                micro, index = xs
                key = jax.random.fold_in(step_key, index) if dropout else None
                g, ce = grad_fn(params, micro, total_weight, key)
                return (jax.tree.map(jnp.add, grads_acc, g), ce_acc + ce), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, ce_sum), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32)), (micro_batches, jnp.arange(grad_accum))
            )

        loss = ce_sum / total_weight
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        # A non-finite loss or gradient must never reach the parameters: keep the old params and
        # optimizer state with a select (no branch, no host sync); the loop applies train.nonfinite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = state["skipped_steps"] + jnp.where(finite, 0, 1).astype(jnp.int32)
        new_state = {
            "params": keep_if(finite, optax.apply_updates(params, updates), params),
            "opt_state": keep_if(finite, opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": rng,
            "skipped_steps": skipped,
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "skipped_steps": skipped,
        }
        return new_state, metrics

    return step


def compile_train_step(step_fn, layout: StateLayout, batch_sharding) -> Callable:
    """Jitted once, with explicit shardings; the old state's buffers are donated."""
    return jax.jit(
        step_fn,
        in_shardings=(layout.shardings, batch_sharding),
        out_shardings=(layout.shardings, None),
        donate_argnums=(0,),
    )


def make_eval_step(layout: StateLayout, batch_sharding) -> Callable[[dict, Batch], tuple[jax.Array, jax.Array]]:
    """(params, batch) -> (sum of token losses, number of tokens)."""

    def eval_step(params, batch):
        logits = forward(layout.graphdef, params, batch)
        ce, _ = token_losses(logits, batch["targets"])
        w = loss_weights(batch)
        return jnp.sum(ce * w), jnp.sum(w)

    return jax.jit(eval_step, in_shardings=(layout.param_shardings, batch_sharding))
