"""Which matrix product a step's dense layers use on a mesh, and which attention: OpenBLAS's kernels
(model/cpu_gemm.py, model/cpu_attention.py) where every CPU device has a core to itself and the parameters
are replicated, else XLA's.

Measured where it was decided (docs/benchmarks.md, issue 16). An FFI call is opaque to XLA's SPMD
partitioner, which would gather its operands onto every device; so on a mesh the product runs inside
`shard_map`: each device multiplies its own rows (the batch is split over `batch_axes`) by the whole
weight, and the weight gradient is summed over the devices, as data parallelism does; attention, whose
batch rows are independent, runs on each device's rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flaxpod.model import cpu_attention, cpu_gemm
from flaxpod.model.layers import AttentionKernel, Matmul, xla_matmul
from flaxpod.sharding.cpu_devices import core_per_device
from flaxpod.train.config import CHOICES
from jax.sharding import Mesh, PartitionSpec

SETTINGS = CHOICES["mesh.cpu_matmul"]  # the config checks them too; a Trainer built directly gets this check


def cpu_kernels(
    mesh: Mesh, batch_axes: tuple[str, ...], params_replicated: bool, setting: str = "auto"
) -> tuple[Matmul, AttentionKernel | None]:
    """The product and attention kernel for a step on `mesh` whose batch rows are split over `batch_axes`:
    OpenBLAS's when `setting` is auto, the mesh's devices are CPUs with a core each and `params_replicated`,
    and the kernels build; otherwise XLA's dot and no attention kernel."""
    if setting not in SETTINGS:
        raise ValueError(f"mesh.cpu_matmul: expected one of {list(SETTINGS)}, got {setting!r}")
    if setting == "xla" or not params_replicated or not core_per_device(mesh) or cpu_gemm.unavailable():
        return xla_matmul, None
    return _blas_matmul(mesh, batch_axes), _blas_attention(mesh, batch_axes)


def _batch_devices(mesh: Mesh, batch_axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[axis] for axis in batch_axes)


def _blas_matmul(mesh: Mesh, batch_axes: tuple[str, ...]) -> Matmul:
    devices = _batch_devices(mesh, batch_axes)
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


def _blas_attention(mesh: Mesh, batch_axes: tuple[str, ...]) -> AttentionKernel:
    devices = _batch_devices(mesh, batch_axes)
    rows = PartitionSpec(batch_axes)

    def attention(q, k, v, mask, causal):
        floats = all(x.dtype == jnp.float32 for x in (q, k, v))
        if not floats or q.shape[0] % devices or (causal and q.shape[1] != k.shape[1]):
            return None

        def on_rows(q_, k_, v_, *mask_):
            return cpu_attention.attention(q_, k_, v_, mask_[0] if mask_ else None, causal)

        operands = (q, k, v) if mask is None else (q, k, v, mask)
        if devices == 1:
            return on_rows(*operands)
        # A mask shared by every row ([1, T, S]) goes whole to each device.
        mask_spec = () if mask is None else (rows if mask.shape[0] > 1 else PartitionSpec(),)
        # check_vma off, as for the products: the FFI call has no rule for it.
        specs = (rows, rows, rows, *mask_spec)
        per_device = jax.shard_map(on_rows, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)
        return per_device(*operands)

    return attention
