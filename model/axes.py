"""Logical axis names for parameters and activations.

Model code names axes only logically ("embed", "heads", ...). Which mesh axes they map to is
decided outside `model/` (see sharding/rules.py), which installs a resolver with
`activation_sharding`; without one, `constrain` is a no-op, so the model runs unsharded as is.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

# Parameter axes.
LAYERS, VOCAB, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, NORM, POSITION = (
    "layers",
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "norm",
    "position",
)
# Activation axes (named apart from parameter axes: the batch is split over fsdp, so the
# residual stream's feature axis must not be).
BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "batch",
    "length",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
)

Resolver = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
_resolver: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("resolver", default=None)


@contextlib.contextmanager
def activation_sharding(resolver: Resolver) -> Iterator[None]:
    """Within this block (while tracing), `constrain` applies `resolver`."""
    token = _resolver.set(resolver)
    try:
        yield
    finally:
        _resolver.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Hints the sharding of an activation by logical names."""
    resolver = _resolver.get()
    return x if resolver is None else resolver(x, names)
