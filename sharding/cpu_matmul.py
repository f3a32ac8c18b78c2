"""Which matrix product a step's dense layers use on a mesh: OpenBLAS's (model/cpu_gemm.py) where every
CPU device has a core to itself and the parameters are replicated, else XLA's.

Measured where it was decided (docs/benchmarks.md, issue 16). An FFI call is opaque to XLA's SPMD
partitioner, which would gather its operands onto every device; so on a mesh the product runs inside
`shard_map`: each device multiplies its own rows (the batch is split over `batch_axes`) by the whole
weight, and the weight gradient is summed over the devices, as data parallelism does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flaxpod.model import cpu_gemm
from flaxpod.model.layers import Matmul, xla_matmul
from flaxpod.sharding.cpu_devices import core_per_device
from flaxpod.train.config import CHOICES
from jax.sharding import Mesh, PartitionSpec

SETTINGS = CHOICES["mesh.cpu_matmul"]  # the config checks them too; a Trainer built directly gets this check


def cpu_matmul(mesh: Mesh, batch_axes: tuple[str, ...], params_replicated: bool, setting: str = "auto") -> Matmul:
    """The product for a step on `mesh` whose batch rows are split over `batch_axes`: OpenBLAS's when
    `setting` is auto, the mesh's devices are CPUs with a core each and `params_replicated`, and the
    kernel builds; otherwise XLA's dot."""
    if setting not in SETTINGS:
        raise ValueError(f"mesh.cpu_matmul: expected one of {list(SETTINGS)}, got {setting!r}")
    if setting == "xla" or not params_replicated or not core_per_device(mesh) or cpu_gemm.unavailable():
        return xla_matmul
    devices = math.prod(mesh.shape[axis] for axis in batch_axes)
    product = cpu_gemm.matmul if devices == 1 else _row_split_matmul(mesh, batch_axes)

    def matmul(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
        same_type = preferred_element_type in (None, jnp.float32)
        if x.dtype != jnp.float32 or w.dtype != jnp.float32 or not same_type or x.shape[0] % devices:
            return xla_matmul(x, w, preferred_element_type)
        return product(x, w)

    return matmul


def _row_split_matmul(mesh: Mesh, batch_axes: tuple[str, ...]) -> cpu_gemm.Product:
    rows, whole = PartitionSpec(batch_axes, None), PartitionSpec()
    # check_vma off: the FFI call has no rule for it, and the specs below state what each result is.
    on_devices = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    forward = on_devices(cpu_gemm.gemm, in_specs=(rows, whole), out_specs=rows)
    grad_x = on_devices(functools.partial(cpu_gemm.gemm, trans_b=True), in_specs=(rows, whole), out_specs=rows)

    def summed_grad_w(x, g):
        return jax.lax.psum(cpu_gemm.gemm(x, g, trans_a=True), batch_axes)

    grad_w = on_devices(summed_grad_w, in_specs=(rows, rows), out_specs=whole)
    return cpu_gemm.matmul_from(forward, grad_x, grad_w)
