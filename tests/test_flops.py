"""FLOPs per token (PaLM / nanoGPT convention) against a hand count of a small model's parameters."""

from __future__ import annotations

import pytest
from flax import nnx
from flaxpod.model.transformer import Transformer, count_params
from flaxpod.train.config import ModelConfig
from flaxpod.train.flops import flops_per_token


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flops_per_token_is_6n_plus_attention(family):
    L, d, T, V, h, kv = 3, 32, 16, 50, 4, 2  # noqa: N806
    gpt2 = family == "gpt2"
    cfg = ModelConfig(
        family=family, n_layer=L, n_head=h, n_kv_head=0 if gpt2 else kv, d_model=d, seq_len=T, vocab_size=V
    )
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
    hd = d // h
    if gpt2:  # q,k,v,o + 4 attention biases, up/down (4d) + 2 biases, 2 LayerNorms with bias; final LayerNorm
        f = 4 * d
        per_layer = 4 * d * d + 3 * d + d + 2 * d * f + f + d + 2 * 2 * d
        n = L * per_layer + 2 * d
    else:  # q, o full; k, v for 2 of 4 heads; SwiGLU (8/3*32 = 85, rounded up to 128); 2 RMSNorms; final RMSNorm
        f = 128
        per_layer = 2 * d * h * hd + 2 * d * kv * hd + 3 * d * f + 2 * d
        n = L * per_layer + d
    # Tied head: the embedding (and gpt2's position table) is not counted, as in nanoGPT's estimate_mfu.
    assert count_params(params, exclude_embeddings=True) == n
    assert count_params(params) == n + V * d + (T * d if gpt2 else 0)
    expected = 6 * n + 12 * L * d * T
    assert flops_per_token(L, d, T, count_params(params, exclude_embeddings=True)) == expected


def test_cpu_peak_is_measured_on_every_device_at_once_and_an_override_wins():
    import jax
    import numpy as np
    from flaxpod.train.flops import peak_flops_per_device
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    peak, source = peak_flops_per_device(mesh)
    assert 1e8 < peak < 1e13 and source.endswith("on every device at once")
    assert peak_flops_per_device(mesh, override=5e11) == (5e11, "config logging.peak_flops")
