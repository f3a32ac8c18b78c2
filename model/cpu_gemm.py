"""float32 matrix products on the CPU through OpenBLAS's sgemm instead of XLA's Eigen kernels.

Why: the matrix products are most of a CPU training step (2.9 of 3.7 s for nanoGPT's 6-layer, 384-wide
shape), and jaxlib's Eigen kernels are slow on one core: that model's MLP products took 59.6 / 38.2 /
57.7 ms (forward, down projection, weight gradient) against 36.7 / 31.0 / 35.9 ms for OpenBLAS and
37.4 / 45.7 / 45.6 for PyTorch (docs/benchmarks.md, issue 16; jaxlib 0.10.2's kernels look built without
FMA instructions). XLA:CPU offers no other BLAS: oneDNN and XNNPACK matched Eigen, YNNPACK won on one
product of three. So cpu_gemm.cc, a small XLA FFI handler, calls the sgemm of SciPy's OpenBLAS (SciPy
is a JAX dependency; its `cython_blas` hands out the function's address). The same library holds the
attention kernel (cpu_attention.cc, model/cpu_attention.py), which calls that sgemm too (cpu_blas.h).
It is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`) against the FFI headers
jaxlib ships, into a cache directory (`$FLAXPOD_CACHE_DIR`, else `$XDG_CACHE_HOME/flaxpod`, else
~/.cache/flaxpod), keyed by the sources and jaxlib's version; without a compiler, or if anything fails,
products and attention stay on XLA's kernels (one warning).

OpenBLAS is set to one thread per call (all BLAS libraries of the process, through threadpoolctl): the
kernels run where each CPU device has a core to itself (sharding/cpu_matmul.py decides), and BLAS
threads of their own would fight the other devices' for the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

# One library: the products (cpu_gemm.cc) and attention (cpu_attention.cc, model/cpu_attention.py), both
# calling the sgemm that cpu_blas.h declares.
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_gemm.cc", "cpu_attention.cc"))
HEADER = Path(__file__).with_name("cpu_blas.h")
TARGET = "flaxpod_gemm_f32"
# FFI target name -> the library's handler symbol.
HANDLERS = {
    TARGET: "FlaxpodGemmF32",
    "flaxpod_attention_forward_f32": "FlaxpodAttentionForwardF32",
    "flaxpod_attention_backward_f32": "FlaxpodAttentionBackwardF32",
}
Product = Callable[[jax.Array, jax.Array], jax.Array]


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get("FLAXPOD_CACHE_DIR"):
        return Path(os.environ["FLAXPOD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flaxpod"


def build(directory: Path) -> Path:
    """The compiled library, built now unless the cache already holds it. Raises RuntimeError naming the
    compiler and its first error line when the build fails."""
    include = jax.ffi.include_dir()
    code = b"".join(path.read_bytes() for path in (*SOURCES, HEADER))
    key = hashlib.sha256(code + jaxlib.__version__.encode()).hexdigest()[:16]
    library = directory / f"libflaxpod_cpu_gemm-{key}.so"
    if library.exists():
        return library
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler '{compiler}' on PATH (set CXX)")
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: a concurrent or killed build never leaves a partial library.
    fd, partial = tempfile.mkstemp(prefix=library.stem, suffix=".so.partial", dir=directory)
    os.close(fd)
    # -O3: gcc vectorizes the attention kernel's softmax loops only from -O3 on.
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", f"-I{include}", *map(str, SOURCES), "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise RuntimeError(f"'{compiler}' failed to build {', '.join(p.name for p in SOURCES)}: {first}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


def _scipy_sgemm() -> int:
    """The address of SciPy's BLAS sgemm (from the capsule scipy.linalg.cython_blas exports)."""
    from scipy.linalg import cython_blas

    capsule = cython_blas.__pyx_capi__["sgemm"]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))


@functools.cache
def unavailable() -> str | None:
    """None once the kernels are built, loaded and registered with XLA; else why not (warned once)."""
    try:
        from threadpoolctl import threadpool_limits

        library = ctypes.CDLL(str(build(cache_dir())))
        library.flaxpod_set_sgemm(ctypes.c_void_p(_scipy_sgemm()))
        threadpool_limits(1, user_api="blas")
        for target, symbol in HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except Exception as error:  # any failure leaves XLA's products, which are correct, only slower
        reason = f"{type(error).__name__}: {error}"
        message = f"flaxpod: CPU matrix products and attention stay on XLA's kernels ({reason})"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return reason
    return None


def gemm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) for 2-D float32 arrays, op = transpose where asked, through the kernel (which must
    be available)."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    # vmap_method: a batch of products runs as a loop of products (nothing here vmaps; correct if it does)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, trans_a=trans_a, trans_b=trans_b)


def matmul_from(forward: Product, grad_x: Product, grad_w: Product) -> Product:
    """x [m, k] @ w [k, n] with a hand-written VJP: `forward(x, w)`, `grad_x(g, w)` = g @ w^T and
    `grad_w(x, g)` = x^T @ g (XLA's own dots get theirs from autodiff; an FFI call has none)."""

    @jax.custom_vjp
    def product(x, w):
        return forward(x, w)

    def forward_rule(x, w):
        return forward(x, w), (x, w)

    def backward_rule(saved, g):
        x, w = saved
        return grad_x(g, w), grad_w(x, g)

    product.defvjp(forward_rule, backward_rule)
    return product


# One device's product: the forward and both gradients through the kernel.
matmul = matmul_from(gemm, functools.partial(gemm, trans_b=True), functools.partial(gemm, trans_a=True))
