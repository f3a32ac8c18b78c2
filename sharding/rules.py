"""Logical-axis rules: which mesh axes each logical axis name of the model is split over.

Changing the parallelism is a config change: pick a preset (`mesh.rules`) and override single
entries (`mesh.rule_overrides`). A dimension that a rule's mesh axes do not divide is left
unsplit (and shown so in the start-up table) instead of failing, so small models run on any mesh.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flaxpod.model import axes as ax
from flaxpod.model.errors import ConfigError
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = dict[str, tuple[str, ...]]

_BATCH = {ax.BATCH: ("data", "fsdp")}
_FSDP = {ax.EMBED: ("fsdp",)}
_TENSOR = {
    ax.HEADS: ("tensor",),
    ax.KV_HEADS: ("tensor",),
    ax.MLP: ("tensor",),
    ax.VOCAB: ("tensor",),
    ax.ACT_HEADS: ("tensor",),
    ax.ACT_KV_HEADS: ("tensor",),
    ax.ACT_MLP: ("tensor",),
    ax.ACT_VOCAB: ("tensor",),
}
PRESETS: dict[str, Rules] = {
    "dp": {**_BATCH},  # parameters replicated, batch split over every device
    "fsdp": {**_BATCH, **_FSDP},  # + parameters and optimizer state split over fsdp
    "fsdp_tp": {**_BATCH, **_FSDP, **_TENSOR},  # + heads, MLP columns and vocab over tensor
}


LOGICAL_AXES = (
    ax.LAYERS, ax.VOCAB, ax.EMBED, ax.MLP, ax.HEADS, ax.KV_HEADS, ax.HEAD_DIM, ax.NORM, ax.POSITION,
    ax.BATCH, ax.LENGTH, ax.ACT_EMBED, ax.ACT_HEADS, ax.ACT_KV_HEADS, ax.ACT_MLP, ax.ACT_VOCAB,
)  # fmt: skip


def make_rules(preset: str, overrides: Mapping[str, Any] | None = None) -> Rules:
    """The preset's table with `overrides` applied (a value of None or [] unshards that axis)."""
    if preset not in PRESETS:
        raise ConfigError(f"mesh.rules: expected one of {sorted(PRESETS)}, got {preset!r}")
    rules = dict(PRESETS[preset])
    for name, value in (overrides or {}).items():
        if name not in LOGICAL_AXES:  # a typo would silently leave the axis as the preset has it
            close = difflib.get_close_matches(str(name), LOGICAL_AXES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(LOGICAL_AXES)}"
            raise ConfigError(f"mesh.rule_overrides.{name}: unknown logical axis{hint}")
        if value is None:
            rules.pop(name, None)
        else:
            if not isinstance(value, str | list | tuple) or not all(isinstance(a, str) for a in value):
                raise ConfigError(
                    f"mesh.rule_overrides.{name}: expected a mesh axis name, a list of them or null, got {value!r}"
                )
            axes = (value,) if isinstance(value, str) else tuple(value)
            for axis in axes:
                if axis not in ("data", "fsdp", "tensor"):
                    raise ConfigError(
                        f"mesh.rule_overrides.{name}: unknown mesh axis {axis!r} (expected data, fsdp or tensor)"
                    )
            rules[name] = axes
    return rules


def logical_to_spec(
    names: Sequence[str | None], rules: Rules, mesh: Mesh, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """PartitionSpec for logical `names`. Mesh axes of size 1, axes already used by an earlier
    dimension, and splits that do not divide the dimension are dropped."""
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(names):
        axes = [a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1] if name else []
        if shape is not None and axes:
            ways = 1
            for a in axes:
                ways *= mesh.shape[a]
            if shape[i] % ways:
                axes = []
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def activation_resolver(mesh: Mesh, rules: Rules):
    """A resolver for model.axes.activation_sharding: logical names -> sharding constraint."""

    def resolve(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        spec = logical_to_spec(names, rules, mesh, x.shape)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return resolve
