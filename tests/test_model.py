"""The transformer alone: shapes, causality, document isolation and equivalent code paths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flaxpod.model.transformer import Transformer, count_params
from flaxpod.train.config import ModelConfig


def small(family: str, **kw) -> ModelConfig:
    base = dict(
        family=family,
        n_layer=2,
        n_head=4,
        n_kv_head=2 if family == "llama" else 0,
        d_model=32,
        seq_len=16,
        vocab_size=64,
        tie_embeddings=family == "gpt2",
    )
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0):
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    return graphdef, nnx.to_pure_dict(state)


def logits_fn(cfg, graphdef):
    cfg_graph = graphdef

    @jax.jit
    def f(params, tokens, segment_ids=None, positions=None):
        return nnx.merge(cfg_graph, params)(tokens, segment_ids=segment_ids, positions=positions)

    return f


TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shapes_and_parameter_count(family):
    cfg = small(family)
    graphdef, params = build(cfg)
    logits = logits_fn(cfg, graphdef)(params, TOKENS)
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    d, f, v, n = 32, (4 * 32 if family == "gpt2" else 128), 64, 2  # llama: int(8/3*32) = 85, rounded up to 128
    if family == "gpt2":  # q,k,v,o with biases; LayerNorms with bias; learned positions; tied head
        per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        expected = n * per_layer + v * d + 16 * d + 2 * d
    else:  # GQA: k, v have 2 of 4 heads; SwiGLU; RMSNorm; untied head
        per_layer = 2 * d * d + 2 * d * (d // 2) + 3 * d * f + 2 * d
        expected = n * per_layer + 2 * v * d + d
    assert count_params(params) == expected
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal(family):
    """Changing token t changes no logits before t."""
    cfg = small(family)
    graphdef, params = build(cfg)
    f = logits_fn(cfg, graphdef)
    base = np.asarray(f(params, TOKENS))
    t = 9
    changed = np.asarray(f(params, TOKENS.at[:, t].set((TOKENS[:, t] + 1) % 64)))
    np.testing.assert_allclose(changed[:, :t], base[:, :t], atol=1e-6)
    assert np.abs(changed[:, t:] - base[:, t:]).max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_document_equals_document_alone(family):
    """With segment ids and restarting positions, a document's logits in a packed row equal its
    logits when it is alone in the row."""
    cfg = small(family)
    graphdef, params = build(cfg)
    f = logits_fn(cfg, graphdef)
    doc_a, doc_b = TOKENS[0, :10], TOKENS[1, :6]
    packed = jnp.concatenate([doc_a, doc_b])[None]
    segments = jnp.array([[1] * 10 + [2] * 6])
    positions = jnp.array([list(range(10)) + list(range(6))])
    out = np.asarray(f(params, packed, segments, positions))[0]
    alone_b = np.asarray(f(params, doc_b[None]))[0]
    alone_a = np.asarray(f(params, doc_a[None]))[0]
    np.testing.assert_allclose(out[:10], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[10:], alone_b, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_equivalent_paths(family):
    """Fused attention, the Python layer loop and rematerialization compute the same function."""
    cfg = small(family)
    graphdef, params = build(cfg)
    ref = np.asarray(logits_fn(cfg, graphdef)(params, TOKENS))
    for change in ({"attention": "fused"}, {"scan_layers": False}, {"remat": "full"}, {"remat": "dots"}):
        other = dataclasses.replace(cfg, **change)
        g2, p2 = build(other)
        out = np.asarray(logits_fn(other, g2)(params, TOKENS))
        np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=str(change))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mlp_in_blocks_equals_the_whole_mlp(family):
    """model.mlp_chunks=4 (the hidden width in 4 blocks, partial outputs summed) computes the same logits
    and parameter gradients as one block, biases and the SwiGLU gate included. The parameters are
    perturbed so the biases are not zero (a bias added once per block would then show)."""
    cfg = small(family)
    graphdef, params = build(cfg)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])
    weights = jax.random.normal(jax.random.key(4), (2, 16, 64))

    def logits_and_grads(c):
        g, _ = build(c)
        f = logits_fn(c, g)
        return f(params, TOKENS), jax.grad(lambda p: jnp.sum(f(p, TOKENS) * weights))(params)

    ref, ref_grads = logits_and_grads(cfg)
    out, grads = logits_and_grads(dataclasses.replace(cfg, mlp_chunks=4))
    assert cfg.mlp_width == 128 and float(jnp.abs(params["blocks"]["mlp"]["down"]).max()) > 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    flat_grads = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, a), b in zip(flat_grads, jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )


def test_bfloat16_compute_close_to_float32():
    cfg = small("llama")
    graphdef, params = build(cfg)
    ref = np.asarray(logits_fn(cfg, graphdef)(params, TOKENS))
    bf = dataclasses.replace(cfg, dtype="bfloat16")
    g2, _ = build(bf)
    out = logits_fn(bf, g2)(params, TOKENS)
    assert out.dtype == jnp.float32  # logits stay float32 for the loss
    assert np.abs(np.asarray(out) - ref).max() < 0.05


def test_dropout_changes_output_only_with_a_key():
    cfg = small("gpt2", dropout=0.5)
    graphdef, params = build(cfg)
    model = nnx.merge(graphdef, params)
    a = model(TOKENS)
    b = model(TOKENS)
    c = model(TOKENS, dropout_key=jax.random.key(0))
    d = model(TOKENS, dropout_key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_blocks_equal_full_attention(family, monkeypatch):
    """Causal attention computed in query blocks (skipping the all-masked key blocks) gives the logits
    and the gradient of full attention, with blocks that do not divide the length and packed documents
    whose boundaries fall inside blocks. Reference: jax.nn.dot_product_attention (attention: fused)."""
    from flaxpod.model import layers

    cfg = small(family)
    graphdef, params = build(cfg)
    segments = jnp.array([[1] * 7 + [2] * 9, [1] * 16])
    positions = jnp.array([list(range(7)) + list(range(9)), list(range(16))])

    def loss_and_grad(config):
        g, _ = build(config)

        def loss(p):
            logits = nnx.merge(g, p)(TOKENS, segment_ids=segments, positions=positions)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, ref_logits), ref_grad = loss_and_grad(dataclasses.replace(cfg, attention="fused"))
    monkeypatch.setattr(layers, "CAUSAL_BLOCKING_FROM", 16)
    monkeypatch.setattr(layers, "CAUSAL_BLOCKS", 3)  # 16 = 6 + 6 + 4
    assert layers.causal_block_rows(16) == 6 and layers.causal_block_rows(15) == 15
    (_, logits), grad = loss_and_grad(cfg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
