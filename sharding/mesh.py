"""Device meshes, shardings of parameters / optimizer state / batches, and the start-up table."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from flaxpod.sharding.rules import Rules, logical_to_spec
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def build_mesh(data: int, fsdp: int, tensor: int, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. Auto axis types let GSPMD propagate shardings through
    ops the model does not annotate (jax 0.10 defaults to Explicit, which would not)."""
    devices = devices if devices is not None else jax.devices()
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
    """Pure dict of NamedSharding mirroring the model's parameters, from their `axes` metadata."""

    def one(var: nnx.Variable) -> NamedSharding:
        names = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(names, rules, mesh, var.shape))

    shardings = jax.tree.map(one, abstract_state, is_leaf=_is_variable)
    return nnx.to_pure_dict(shardings)


def _path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of [batch, length] arrays: rows split over the batch axes of the rules."""
    from flaxpod.model.axes import BATCH, LENGTH

    return NamedSharding(mesh, logical_to_spec((BATCH, LENGTH), rules, mesh))


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays (each process passes only its own rows). `sharding` is
    that of [batch, length] arrays; per-row arrays ([batch], e.g. class labels) split their rows the
    same way."""
    per_row = NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0] if sharding.spec else None))

    def put(value) -> jax.Array:
        value = np.asarray(value)
        return jax.make_array_from_process_local_data(per_row if value.ndim == 1 else sharding, value)

    return {k: put(v) for k, v in batch.items()}


def sharding_table(params_shapes: dict, params_shardings: dict) -> str:
    """Each parameter's shape, spec and bytes on one device (float32)."""
    rows = []
    total = 0
    flat_shapes = jax.tree_util.tree_flatten_with_path(params_shapes)[0]
    flat_shardings = jax.tree.leaves(params_shardings)
    for (path, leaf), sharding in zip(flat_shapes, flat_shardings, strict=True):
        shard_shape = sharding.shard_shape(tuple(leaf.shape))
        nbytes = int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        name = "/".join(str(n) for n in _path_names(path))
        rows.append(f"  {name:<32} {str(tuple(leaf.shape)):<22} {str(sharding.spec):<40} {nbytes:>12,}")
    header = f"  {'parameter':<32} {'shape':<22} {'spec':<40} {'bytes/device':>12}"
    return "\n".join([header, *rows, f"  {'total':<96} {total:>12,}"])
