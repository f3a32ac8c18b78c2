"""Optax optimizer: AdamW with a weight-decay mask, warm-up + decay schedules, global-norm clipping."""

from __future__ import annotations

import jax
import optax
from flaxpod.train.config import OptimConfig


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then `schedule` down to `min_lr` at `decay_steps` (counted
    from step 0, like nanoGPT's lr_decay_iters), constant afterwards."""
    decay_steps = max(optim.decay_steps or total_steps, optim.warmup_steps + 1)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, optim.warmup_steps, decay_steps, end_value=optim.min_lr
        )
    warmup = optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
    if optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, optim.min_lr, decay_steps - optim.warmup_steps)
    else:
        decay = optax.constant_schedule(optim.lr)
    return optax.join_schedules([warmup, decay], [optim.warmup_steps])


def decay_mask(params):
    """Weight decay on matrices and embeddings only: not on norm scales or biases (which are
    2-D when layers are stacked, so the usual `ndim >= 2` test would be wrong here)."""

    def decayed(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name != "scale" and not name.endswith("bias")

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(optim: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=optim.beta1,
        b2=optim.beta2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=decay_mask,
    )
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw), schedule
    return adamw, schedule
