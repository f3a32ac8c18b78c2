"""Device meshes, shardings of parameters / optimizer state / batches, and the start-up table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flaxpod.sharding.rules import Rules, logical_to_spec
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def build_mesh(
    data: int, fsdp: int, tensor: int, devices: list | None = None, *, dcn_data: int = 1, dcn_fsdp: int = 1
) -> Mesh:
    """A (data, fsdp, tensor) mesh. Auto axis types let GSPMD propagate shardings through
    ops the model does not annotate (jax 0.10 defaults to Explicit, which would not).

    ``dcn_data`` / ``dcn_fsdp`` > 1 split those axes across TPU slices or GPU nodes: along the
    data axis, position ``i`` lives in slice ``i // (data // dcn_data)``, so gradient all-reduces
    of data parallelism cross the slow data-center network while fsdp/tensor collectives stay on
    ICI/NVLink inside a slice (``mesh_utils.create_hybrid_device_mesh``)."""
    devices = devices if devices is not None else jax.devices()
    axis_types = (AxisType.Auto,) * 3
    if dcn_data * dcn_fsdp == 1:
        return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_device_array((data, fsdp, tensor), (dcn_data, dcn_fsdp, 1), devices), MESH_AXES, axis_types)


def hybrid_device_array(shape: tuple[int, ...], dcn_shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """Devices laid out as ``shape``, whose axes are split ``dcn_shape`` ways across granules
    (TPU slices; else groups of processes, one group per node).

    Raises ValueError naming the counts when the devices do not form ``prod(dcn_shape)`` equal granules."""
    if any(size % dcn for size, dcn in zip(shape, dcn_shape, strict=True)):
        raise ValueError(f"mesh {shape} cannot be split {dcn_shape} ways across slices/nodes")
    ici_shape = tuple(size // dcn for size, dcn in zip(shape, dcn_shape, strict=True))
    granules = math.prod(dcn_shape)
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) == granules:  # a TPU multislice job
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    processes = sorted({d.process_index for d in devices})
    if len(processes) % granules:
        raise ValueError(
            f"{len(devices)} devices in {len(slices)} slice(s) and {len(processes)} process(es) cannot form "
            f"{granules} slices/nodes (mesh.dcn_data * mesh.dcn_fsdp)"
        )
    if len(processes) == granules:  # one process per node (CPU, or one process driving all of a node's GPUs)
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=True)
    # One process per GPU (SLURM, one task per GPU): a node is a block of consecutive ranks (srun's default
    # block distribution). create_hybrid_device_mesh groups only by slice_index or process_index, so each
    # device is presented with its node number as slice_index and unwrapped afterwards.
    per_node = len(processes) // granules
    node_of = {p: rank // per_node for rank, p in enumerate(processes)}
    tagged = [_NodeTagged(d, node_of[d.process_index]) for d in devices]
    array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, tagged)
    return np.vectorize(lambda t: t.device, otypes=[object])(array)


class _NodeTagged:
    """A device seen with ``slice_index`` = its node (everything else is the device's own)."""

    def __init__(self, device: Any, node: int):
        self.device = device
        self.slice_index = node

    def __getattr__(self, name: str) -> Any:
        return getattr(self.device, name)


def local_devices(mesh: Mesh) -> list:
    """The mesh's devices that this process drives, in mesh order."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


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
