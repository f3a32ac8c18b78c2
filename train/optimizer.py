"""Optax optimizer: AdamW with a weight-decay mask, warm-up + decay schedules, global-norm clipping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import optax
from flaxpod.model.config import LoraConfig
from flaxpod.model.lora import ADAPTERS
from flaxpod.train.config import ConfigError, OptimConfig


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


# Parameter groups of finetuning (lr multipliers, freezing), by top-level parameter name.
PARAM_GROUPS = {
    "embed": "embed",
    "pos_embed": "embed",
    "blocks": "blocks",
    "final_norm": "head",
    "lm_head": "head",
    "cls_head": "task_head",
}
FROZEN = "frozen"


def param_groups(params) -> dict:
    """The group name of every parameter leaf (a tree like `params`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: PARAM_GROUPS[path[0].key], params)


def trainable_mask(params, frozen: Sequence[str] = (), lora: LoraConfig | None = None):
    """A tree like `params` of Python bools: True where the parameter trains. Without LoRA every group
    not in `frozen` trains; with LoRA (rank > 0) only the adapters, the task head and the groups of
    `lora.train_fully` (`norms`: every norm's scale and bias; `embed`; `head`: lm_head and final_norm) do."""
    frozen = set(frozen)
    use_lora = lora is not None and lora.rank > 0

    def trains(path, _) -> bool:
        keys = [str(getattr(k, "key", k)) for k in path]
        group = PARAM_GROUPS[keys[0]]
        if group in frozen:
            return False
        if not use_lora or ADAPTERS in keys or group == "task_head":
            return True
        full = set(lora.train_fully)
        return group in full or ("norms" in full and any(k.endswith("norm") for k in keys))

    return jax.tree_util.tree_map_with_path(trains, params)


def make_optimizer(
    optim: OptimConfig,
    total_steps: int,
    *,
    lr_mult: Mapping[str, float] | None = None,
    frozen: Sequence[str] = (),
    lora: LoraConfig | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay mask, schedule) after global-norm clipping. With `lr_mult` or `frozen` (finetuning),
    each parameter group gets its learning rate scaled, and frozen groups get no update and no
    optimizer state; the clipping norm then counts only the trained parameters. With `lora` (rank > 0)
    the base weights are frozen the same way and only `trainable_mask`'s parameters train."""
    schedule = make_schedule(optim, total_steps)

    def adamw(scale: float = 1.0) -> optax.GradientTransformation:
        lr = schedule if scale == 1.0 else (lambda step: scale * schedule(step))
        return optax.adamw(
            lr, b1=optim.beta1, b2=optim.beta2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask
        )

    lr_mult, frozen = dict(lr_mult or {}), set(frozen)
    unknown = sorted((set(lr_mult) | frozen) - set(PARAM_GROUPS.values()))
    if unknown:
        raise ConfigError(
            f"finetune.lr_mult/freeze: unknown parameter group {unknown[0]!r}; groups: "
            f"{sorted(set(PARAM_GROUPS.values()))}"
        )
    if not lr_mult and not frozen:
        update = adamw()
    else:
        groups = sorted(set(PARAM_GROUPS.values()) - frozen)
        update = optax.multi_transform({g: adamw(lr_mult.get(g, 1.0)) for g in groups}, param_groups)
    clipped = optax.chain(optax.clip_by_global_norm(optim.grad_clip), update) if optim.grad_clip > 0 else update
    if not frozen and not (lora is not None and lora.rank > 0):
        return clipped, schedule

    def train_or_frozen(params):
        return jax.tree.map(lambda t: "train" if t else FROZEN, trainable_mask(params, frozen, lora))

    return optax.multi_transform({"train": clipped, FROZEN: optax.set_to_zero()}, train_or_frozen), schedule
