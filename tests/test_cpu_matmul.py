"""model/cpu_gemm.py, model/cpu_attention.py and sharding/cpu_matmul.py: float32 products and attention
through OpenBLAS on CPU devices that have a core each (the suite's 8 devices on 2 cores), checked against
XLA's: the kernels alone, the model's logits and every gradient, and whole training steps on a
data-parallel mesh; the fallbacks to XLA."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flaxpod.model import cpu_attention, cpu_gemm
from flaxpod.model.layers import MASKED_SCORE, step_kernels, xla_matmul
from flaxpod.model.transformer import Transformer
from flaxpod.sharding import cpu_matmul as cpu_matmul_module
from flaxpod.sharding.cpu_matmul import cpu_kernels
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


def reference_attention(q, k, v, mask, causal):
    """Plain softmax attention written with XLA's ops, masked keys biased by MASKED_SCORE as the model does."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    allowed = np.ones((1, q.shape[1], k.shape[1]), bool)
    if causal:
        allowed &= np.tril(allowed[0])[None]
    if mask is not None:
        allowed = allowed & mask
    weights = jax.nn.softmax(scores + jnp.where(allowed, 0.0, MASKED_SCORE)[:, None], axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights, v, precision="highest")


segments = np.sort(RNG.integers(0, 3, (2, 70)), axis=1)
padded_row = np.ones((1, 70, 70), bool)
padded_row[:, 5] = False  # a query that sees no key: the uniform average of the values, as XLA's path gives


@pytest.mark.parametrize(
    "kv_heads, mask, causal",
    [
        (2, None, True),  # grouped-query heads; 70 rows: a full 64-row block and a short one
        (4, segments[:, :, None] == segments[:, None, :], True),  # packed documents
        (4, RNG.random((2, 70, 70)) > 0.3, False),  # an encoder's arbitrary mask
        (4, padded_row, False),
    ],
)
def test_the_attention_kernel_equals_softmax_attention_and_its_gradients(kv_heads, mask, causal):
    q = RNG.standard_normal((2, 70, 4, 16)).astype(np.float32)
    k, v = (RNG.standard_normal((2, 70, kv_heads, 16)).astype(np.float32) for _ in range(2))
    d_out = jnp.asarray(RNG.standard_normal(q.shape).astype(np.float32))
    out, grads = jax.vjp(lambda q, k, v: cpu_attention.attention(q, k, v, mask, causal), q, k, v)
    ref, ref_grads = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask, causal), q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads(d_out), ref_grads(d_out), strict=True):
        assert float(jnp.abs(want).max()) > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_logits_and_all_gradients_equal_xla(family):
    """One device's products (forward, input and weight gradients through the kernel) and attention in
    the whole model: biases, SwiGLU's gate, grouped-query heads, packed documents, the tied or untied head."""
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

    segment_ids = jnp.asarray([[0] * 6 + [1] * 10, [0] * 16])  # packed documents in the first row

    def logits_and_grads(matmul, attention):
        def logits(p):
            with step_kernels(matmul, attention):
                return nnx.merge(graphdef, p)(tokens, segment_ids=segment_ids)

        gradients = jax.jit(jax.grad(lambda p: jnp.sum(logits(p) * weights)))
        hlo = gradients.lower(params).as_text()
        grads = gradients(params)
        calls = hlo.count(cpu_gemm.TARGET), hlo.count(cpu_attention.BACKWARD)
        return jax.jit(logits)(params), grads, calls

    ref, ref_grads, xla_calls = logits_and_grads(xla_matmul, None)
    out, grads, kernel_calls = logits_and_grads(lambda x, w, _: cpu_gemm.matmul(x, w), cpu_attention.attention)
    assert xla_calls == (0, 0) and kernel_calls[0] >= 4 and kernel_calls[1] >= 1  # products and attention
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
    calls = hlo.count(cpu_gemm.TARGET) + hlo.count(cpu_attention.FORWARD)
    return np.array(losses), jax.tree.map(np.asarray, state.params), calls


@pytest.mark.parametrize("mesh_shape, rules", [((8, 1, 1), "fsdp_tp"), ((2, 4, 1), "dp")])
def test_data_parallel_steps_through_the_kernel_equal_xla(mesh_shape, rules):
    """Each device multiplies its rows and attends over them; weight gradients are summed across the batch
    axes (data, and fsdp under the `dp` rules, whose parameters are replicated): three steps with gradient
    accumulation give XLA's losses and parameters."""
    ref_losses, ref_params, xla_calls = train(mesh_shape, rules, "xla")
    losses, params, kernel_calls = train(mesh_shape, rules, "auto")
    assert xla_calls == 0 and kernel_calls > 0
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_xla_where_parameters_are_split_or_devices_share_cores(monkeypatch):
    rows = ("data", "fsdp")
    eight, one = build_mesh(8, 1, 1), build_mesh(1, 1, 1, devices=jax.devices()[:1])
    xla = (xla_matmul, None)
    matmul, attention = cpu_kernels(eight, rows, True)
    assert matmul is not xla_matmul and attention is not None
    assert cpu_kernels(eight, rows, False) == xla  # fsdp / tensor-sharded parameters: XLA partitions
    assert cpu_kernels(one, rows, True) == xla  # one device on 2 cores runs XLA's thread pool
    assert cpu_kernels(eight, rows, True, "xla") == xla
    with pytest.raises(ValueError, match="mesh.cpu_matmul: expected one of \\['auto', 'xla'\\], got 'blas'"):
        cpu_kernels(eight, rows, True, "blas")
    monkeypatch.setattr(cpu_matmul_module.cpu_gemm, "unavailable", lambda: "no compiler")
    assert cpu_kernels(eight, rows, True) == xla


def test_bfloat16_and_uneven_rows_fall_back_to_xla():
    """Per call: 12 rows on 8 devices, bfloat16 operands or a bfloat16 result stay on XLA; 8 rows do not.
    Attention likewise (None: the model runs XLA's), and a causal call needs as many queries as keys."""
    matmul, attention = cpu_kernels(build_mesh(8, 1, 1), ("data", "fsdp"), True)
    q = jnp.ones((8, 4, 2, 8))
    assert attention(q[:6], q[:6], q[:6], None, True) is None
    assert attention(q.astype(jnp.bfloat16), q, q, None, True) is None
    assert attention(q, q[:, :3], q[:, :3], None, True) is None
    shared_mask = jnp.ones((1, 4, 4), bool)
    assert cpu_attention.FORWARD in jax.jit(lambda q: attention(q, q, q, shared_mask, False)).lower(q).as_text()
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
    assert failed.stdout.startswith("\"RuntimeError: 'false' failed to build cpu_gemm.cc, cpu_attention.cc")
    assert list((tmp_path / "cache").iterdir()) == []  # the partial output was removed
    assert run_build(tmp_path).stdout.strip() == "None"
    (library,) = (tmp_path / "cache").iterdir()
    built = library.stat().st_mtime_ns
    assert run_build(tmp_path, CXX="false").stdout.strip() == "None"  # cached: no compiler needed
    assert library.stat().st_mtime_ns == built
