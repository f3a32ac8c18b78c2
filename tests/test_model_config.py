"""ModelConfig: derived sizes against published Hugging Face models, and bad values refused by name."""

from __future__ import annotations

import re

import pytest
from flaxpod.model.config import ModelConfig
from flaxpod.model.errors import ConfigError
from flaxpod.train.config import load_config


@pytest.mark.parametrize(
    "d_model, n_head, intermediate_size",
    [
        (576, 9, 1536),  # HuggingFaceTB/SmolLM-135M
        (960, 15, 2560),  # HuggingFaceTB/SmolLM-360M
        (128, 4, 384),  # configs/tiny.yaml: existing run directories store d_ff=0 and must keep this shape
    ],
)
def test_llama_mlp_width_rule(d_model, n_head, intermediate_size):
    # intermediate_size as in each model's config.json on the Hugging Face hub.
    assert ModelConfig(family="llama", d_model=d_model, n_head=n_head).mlp_width == intermediate_size


@pytest.mark.parametrize(
    "d_model, n_head, intermediate_size",
    [
        (4096, 32, 11008),  # meta-llama/Llama-2-7b-hf (and Llama-1 7B): Meta rounds to 256
        (2048, 32, 5632),  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    ],
)
def test_meta_widths_are_set_explicitly(d_model, n_head, intermediate_size):
    rule = ModelConfig(family="llama", d_model=d_model, n_head=n_head).mlp_width
    assert rule != intermediate_size  # hence d_ff must be given for these models (configs/llama_*.yaml do)
    assert (
        ModelConfig(family="llama", d_model=d_model, n_head=n_head, d_ff=intermediate_size).mlp_width
        == intermediate_size
    )


def test_derived_sizes():
    gpt2 = ModelConfig(family="gpt2", d_model=64, n_head=4, seq_len=32)
    assert (gpt2.kv_heads, gpt2.head_dim, gpt2.mlp_width, gpt2.max_len) == (4, 16, 256, 32)
    assert gpt2.learned_positions and gpt2.has_bias and not gpt2.is_llama
    assert not ModelConfig(family="gpt2", bias=False).has_bias
    llama = ModelConfig(family="llama", d_model=64, n_head=4, n_kv_head=2, d_ff=100, seq_len=32, max_seq_len=128)
    assert (llama.kv_heads, llama.head_dim, llama.mlp_width, llama.max_len) == (2, 16, 100, 128)
    assert llama.is_llama and not llama.learned_positions and not llama.has_bias


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"family": "lama"}, "model.family: expected one of ['gpt2', 'llama'], got 'lama'"),
        ({"dtype": "bf16"}, "model.dtype: expected one of ['float32', 'bfloat16'], got 'bf16'"),
        ({"remat": "all"}, "model.remat: expected one of ['none', 'full', 'dots'], got 'all'"),
        ({"n_layer": 0}, "model.n_layer: must be positive, got 0"),
        ({"d_ff": -1}, "model.d_ff: must be >= 0"),
        ({"n_head": 3, "d_model": 32}, "model.d_model: 32 is not divisible by model.n_head=3"),
        ({"dropout": 1.0}, "model.dropout: expected a rate in [0, 1), got 1.0"),
    ],
)
def test_constructor_refuses_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig(**kwargs)


def test_yaml_literal_typo_fails_at_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  attention: fussed\n")
    with pytest.raises(ConfigError, match=r"^model.attention: expected one of \['einsum', 'fused'\], got 'fussed'$"):
        load_config(path)


def test_make_param_refuses_an_unknown_init():
    from flaxpod.model.layers import make_param

    assert float(make_param(None, (2,), ("norm",), 0, init="ones")[...].sum()) == 2.0
    with pytest.raises(ValueError, match=r"init expected one of \['normal', 'ones', 'zeros'\], got 'one'"):
        make_param(None, (2,), ("norm",), 0, init="one")
