"""model/cpu_gemm.py and sharding/cpu_matmul.py: float32 products through OpenBLAS on CPU devices that have
a core each (the suite's 8 devices on 2 cores), checked against XLA's: the kernel alone, the model's logits
and every gradient, and whole training steps on a data-parallel mesh; the fallbacks to XLA."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flaxpod.model import cpu_gemm
from flaxpod.model.layers import matmul_kernel, xla_matmul
from flaxpod.model.transformer import Transformer
from flaxpod.sharding import cpu_matmul as cpu_matmul_module
from flaxpod.sharding.cpu_matmul import cpu_matmul
from flaxpod.sharding.mesh import build_mesh
from flaxpod.sharding.rules import make_rules
from flaxpod.train.config import ModelConfig, OptimConfig
from flaxpod.train.objectives import CausalLM
from flaxpod.train.optimizer import make_optimizer
from flaxpod.train.trainer import Trainer

from tests.helpers import REPO

RNG = np.random.default_rng(0)


def test_the_kernel_builds_and_multiplies_like_numpy():
    assert cpu_gemm.unavailable() is None  # a C++ compiler is on this machine: the kernel must build
    a, b = RNG.standard_normal((37, 19)).astype(np.float32), RNG.standard_normal((19, 23)).astype(np.float32)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    cases = {(False, False): (a, b), (True, False): (a.T.copy(), b), (False, True): (a, b.T.copy())}
    cases[(True, True)] = (a.T.copy(), b.T.copy())
    for (trans_a, trans_b), (x, y) in cases.items():
        out = jax.jit(lambda x, y, ta=trans_a, tb=trans_b: cpu_gemm.gemm(x, y, trans_a=ta, trans_b=tb))(x, y)
        assert out.shape == (37, 23) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5, err_msg=f"{trans_a} {trans_b}")
    empty = cpu_gemm.gemm(jnp.zeros((4, 0)), jnp.zeros((0, 3)))  # k = 0: zeros, not XLA's uninitialised buffer
    np.testing.assert_array_equal(np.asarray(empty), np.zeros((4, 3)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_logits_and_all_gradients_equal_xla(family):
    """One device's product (forward, input and weight gradients through the kernel) in the whole model:
    biases, SwiGLU's gate, the tied or untied head."""
    cfg = ModelConfig(
        family=family, n_layer=2, n_head=4, n_kv_head=2 if family == "llama" else 0, d_model=32, seq_len=16,
        vocab_size=64, tie_embeddings=family == "gpt2",
    )  # fmt: skip
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    weights = jax.random.normal(jax.random.key(4), (2, 16, 64))

    def logits_and_grads(matmul):
        def logits(p):
            with matmul_kernel(matmul):
                return nnx.merge(graphdef, p)(tokens)

        hlo = jax.jit(logits).lower(params).as_text()
        grads = jax.jit(jax.grad(lambda p: jnp.sum(logits(p) * weights)))(params)
        return jax.jit(logits)(params), grads, hlo.count(cpu_gemm.TARGET)

    ref, ref_grads, xla_calls = logits_and_grads(xla_matmul)
    out, grads, kernel_calls = logits_and_grads(lambda x, w, _: cpu_gemm.matmul(x, w))
    assert xla_calls == 0 and kernel_calls >= 4  # q, k, v, o, MLP and head products are the kernel's
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    flat_grads = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, a), b in zip(flat_grads, jax.tree.leaves(ref_grads), strict=True):
        assert float(jnp.abs(b).max()) > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )


CFG = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=16, vocab_size=128)
BATCHES = [{k: RNG.integers(0, 128, (16, 16)).astype(np.int32) for k in ("inputs", "targets")} for _ in range(3)]


def train(mesh_shape, rules, matmul):
    tx, schedule = make_optimizer(OptimConfig(warmup_steps=1, lr=1e-2), 10)
    mesh = build_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    trainer = Trainer(CFG, mesh, make_rules(rules), tx, schedule, CausalLM(), grad_accum=2, matmul=matmul)
    state = trainer.init_state(seed=0)
    hlo = trainer.step.lower(state, trainer.put(BATCHES[0])).as_text()
    losses = []
    for batch in BATCHES:
        state, metrics = trainer.step(state, trainer.put(batch))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, state.params), hlo.count(cpu_gemm.TARGET)


@pytest.mark.parametrize("mesh_shape, rules", [((8, 1, 1), "fsdp_tp"), ((2, 4, 1), "dp")])
def test_data_parallel_steps_through_the_kernel_equal_xla(mesh_shape, rules):
    """Each device multiplies its rows; weight gradients are summed across the batch axes (data, and
    fsdp under the `dp` rules, whose parameters are replicated): three steps with gradient accumulation
    give XLA's losses and parameters."""
    ref_losses, ref_params, xla_calls = train(mesh_shape, rules, "xla")
    losses, params, kernel_calls = train(mesh_shape, rules, "auto")
    assert xla_calls == 0 and kernel_calls > 0
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_xla_where_parameters_are_split_or_devices_share_cores(monkeypatch):
    rows = ("data", "fsdp")
    eight, one = build_mesh(8, 1, 1), build_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert cpu_matmul(eight, rows, True) is not xla_matmul
    assert cpu_matmul(eight, rows, False) is xla_matmul  # fsdp / tensor-sharded parameters: XLA partitions
    assert cpu_matmul(one, rows, True) is xla_matmul  # one device on 2 cores runs XLA's thread pool
    assert cpu_matmul(eight, rows, True, "xla") is xla_matmul
    with pytest.raises(ValueError, match="mesh.cpu_matmul: expected one of \\['auto', 'xla'\\], got 'blas'"):
        cpu_matmul(eight, rows, True, "blas")
    monkeypatch.setattr(cpu_matmul_module.cpu_gemm, "unavailable", lambda: "no compiler")
    assert cpu_matmul(eight, rows, True) is xla_matmul


def test_bfloat16_and_uneven_rows_fall_back_to_xla():
    """Per call: 12 rows on 8 devices, bfloat16 operands or a bfloat16 result stay on XLA; 8 rows do not."""
    matmul = cpu_matmul(build_mesh(8, 1, 1), ("data", "fsdp"), True)
    x, w = jnp.ones((12, 8)), jnp.ones((8, 4))
    for args in ((x, w, None), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), None), (x[:8], w, jnp.bfloat16)):
        assert cpu_gemm.TARGET not in jax.jit(lambda a, b, p=args[2]: matmul(a, b, p)).lower(*args[:2]).as_text()
    assert cpu_gemm.TARGET in jax.jit(lambda a, b: matmul(a, b, None)).lower(x[:8], w).as_text()


def run_build(tmp_path, **env) -> subprocess.CompletedProcess:
    code = "from flaxpod.model import cpu_gemm; print(repr(cpu_gemm.unavailable()))"
    environ = {**os.environ, "FLAXPOD_CACHE_DIR": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=environ)


def test_without_a_compiler_products_stay_on_xla_with_one_warning(tmp_path):
    done = run_build(tmp_path, CXX="no-such-c++")
    assert (
        done.returncode == 0
        and done.stdout.strip() == "\"RuntimeError: no C++ compiler 'no-such-c++' on PATH (set CXX)\""
    )
    warned = [line for line in done.stderr.splitlines() if "stay on XLA" in line]
    assert len(warned) == 1, done.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_a_failed_build_leaves_no_library_and_a_built_one_is_reused(tmp_path):
    failed = run_build(tmp_path, CXX="false")  # exits 1 without output
    assert failed.stdout.startswith("\"RuntimeError: 'false' failed to build cpu_gemm.cc")
    assert list((tmp_path / "cache").iterdir()) == []  # the partial output was removed
    assert run_build(tmp_path).stdout.strip() == "None"
    (library,) = (tmp_path / "cache").iterdir()
    built = library.stat().st_mtime_ns
    assert run_build(tmp_path, CXX="false").stdout.strip() == "None"  # cached: no compiler needed
    assert library.stat().st_mtime_ns == built
