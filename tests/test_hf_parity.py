"""Weights exchanged with Hugging Face transformers (torch, CPU, float32), both directions.

Every model is small, random and built here (no hub): our logits and transformers' agree to
1e-4 on the same tokens, greedy generation gives the same tokens, the tokenizers give the same
ids, and export -> import gives back the same parameters.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flaxpod.data.tokenizer import train_char_tokenizer, train_sentencepiece
from flaxpod.model.decode import left_pad, make_generate
from flaxpod.train.config import Config, ModelConfig, TokenizerConfig, TrainConfig
from flaxpod.train.export import run_export
from flaxpod.train.import_hf import import_hf
from flaxpod.train.run_dir import load_run, single_device_mesh, write_params_run
from flaxpod.train.state import abstract_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
NEW_TOKENS = 8


def _text() -> str:
    rng = np.random.default_rng(0)
    syllables = ["ka", "to", "ri", "mun", "sel", "o", "a", "que", "th", "ing", "er", "\n", ", ", ". "]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(4000)]
    return " ".join(words) + " Zebra-quartz 0123456789 ünï"


@pytest.fixture(scope="module")
def text() -> str:
    return _text()


@pytest.fixture(scope="module")
def tokenizers(text):
    return {"char": train_char_tokenizer(text), "sentencepiece": train_sentencepiece([text], 300)}


def _random_params(cfg: ModelConfig, seed: int) -> dict:
    """Random values in every parameter (norm scales around 1, biases non-zero)."""
    _, abstract = abstract_model(cfg)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(path[-1])
        base = 1.0 if "scale" in name else 0.0
        return (base + rng.normal(0, 0.15, s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract))


def _ours_logits(run, ids: list[int]) -> np.ndarray:
    forward = jax.jit(lambda p, x: nnx.merge(run.graphdef, p)(x))
    return np.asarray(forward(run.params, jnp.asarray([ids])))[0]


def _ours_greedy(run, ids: list[int]) -> list[int]:
    gen = make_generate(run.graphdef, max_new_tokens=NEW_TOKENS, eos_id=run.tokenizer.eos_id)
    out, count = gen(run.params, *left_pad([ids]), jax.random.key(0))
    return np.asarray(out[0, : int(count[0])]).tolist()


def _hf_logits_and_greedy(model, ids: list[int], eos_id: int | None) -> tuple[np.ndarray, list[int]]:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0].numpy()
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS)
    new = out[0, len(ids) :].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return logits, new


EXPORT_CASES = {
    "gpt2-bias-tied": dict(family="gpt2", bias=True, tie_embeddings=True, tokenizer="char"),
    "gpt2-nobias-untied": dict(family="gpt2", bias=False, tie_embeddings=False, tokenizer="char"),
    "llama-gqa-tied-sp": dict(family="llama", n_kv_head=2, tie_embeddings=True, tokenizer="sentencepiece"),
    "llama-untied-theta": dict(
        family="llama", n_kv_head=0, tie_embeddings=False, rope_theta=500000.0, tokenizer="char"
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_matches_transformers(case, tokenizers, text, tmp_path):
    spec = dict(EXPORT_CASES[case])
    tok = tokenizers[spec.pop("tokenizer")]
    m = ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=64, max_seq_len=64, vocab_size=tok.vocab_size, **spec)
    cfg = Config(run_dir=str(tmp_path / "run"), model=m, tokenizer=TokenizerConfig(kind=tok.kind))
    params = _random_params(m, seed=len(case))
    write_params_run(tmp_path / "run", cfg, tok, params, step=7)
    shard_bytes = 40_000 if case == "gpt2-bias-tied" else 5 * 1024**3  # one case goes through sharded files
    files = run_export(tmp_path / "run", tmp_path / "hf", max_shard_bytes=shard_bytes)
    if case == "gpt2-bias-tied":
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    expected_class = "GPT2LMHeadModel" if m.family == "gpt2" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = text[:300]
    ids = tok.encode(sample)[:40]
    assert hf_tok.encode(sample, add_special_tokens=False)[:40] == ids
    assert hf_tok.decode(tok.encode(sample)) == sample

    run = load_run(tmp_path / "run", mesh=single_device_mesh())
    ours = _ours_logits(run, ids)
    theirs, hf_greedy = _hf_logits_and_greedy(hf, ids, tok.eos_id)
    assert np.std(ours) > 0.5  # logits far from uniform: a wrong mapping cannot hide
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    assert _ours_greedy(run, ids) == hf_greedy

    # And back: importing the export gives the same parameters and tokenizer.
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    again = load_run(back, mesh=single_device_mesh())
    assert again.tokenizer.fingerprint() == tok.fingerprint()
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


IMPORT_CASES = {
    "gpt2-tied": ("gpt2", dict(tie_word_embeddings=True)),
    "gpt2-untied": ("gpt2", dict(tie_word_embeddings=False)),
    "llama-gqa-untied-theta": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6)),
    "llama-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0)),
}


def _hf_random(family: str, vocab: int, extra: dict):
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **extra,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **extra,
        )
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # random biases and norm scales too, not just the init's zeros and ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model.eval()


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_transformers(case, tokenizers, text, tmp_path):
    family, extra = IMPORT_CASES[case]
    tok = tokenizers["char"]
    hf = _hf_random(family, tok.vocab_size, extra)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "tok")
    import_hf(tmp_path / "hf", tmp_path / "run", tokenizer_dir=tmp_path / "tok")

    run = load_run(tmp_path / "run", mesh=single_device_mesh())
    assert run.cfg.model.family == family and run.step == 0
    assert run.cfg.model.tie_embeddings == extra["tie_word_embeddings"]
    ids = tok.encode(text[:200])[:40]
    ours = _ours_logits(run, ids)
    theirs, hf_greedy = _hf_logits_and_greedy(hf, ids, None)
    assert np.std(ours) > 0.5
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    if case in ("gpt2-untied", "llama-gqa-untied-theta"):  # decoding is covered by the export cases too
        assert _ours_greedy(run, ids) == hf_greedy


def test_unsupported_inputs_are_refused(tmp_path, tokenizers):
    tok = tokenizers["char"]
    # A gpt2-family model with grouped-query attention has no GPT2LMHeadModel equivalent.
    m = ModelConfig(family="gpt2", n_layer=1, n_head=4, n_kv_head=2, d_model=16, seq_len=8, vocab_size=tok.vocab_size)
    cfg = Config(run_dir=str(tmp_path / "gqa"), model=m, tokenizer=TokenizerConfig(kind="char"))
    write_params_run(tmp_path / "gqa", cfg, tok, _random_params(m, 0))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no grouped-query attention"):
        run_export(tmp_path / "gqa", tmp_path / "gqa_hf")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pytorch_model.bin, a pickle"):
        import_hf(pickled, tmp_path / "out1", tokenizer_dir=tmp_path / "gqa" / "tokenizer")

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'BertForMaskedLM'"):
        import_hf(bert, tmp_path / "out2")

    biased = tmp_path / "biased"
    biased.mkdir()
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "attention_bias": True}
    (biased / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        import_hf(biased, tmp_path / "out3")

    # A model directory without a tokenizer flaxpod can read, and no --tokenizer.
    notok = tmp_path / "notok"
    _hf_random("gpt2", tok.vocab_size, {}).save_pretrained(notok)
    with pytest.raises(ValueError, match="no tokenizer flaxpod can read"):
        import_hf(notok, tmp_path / "out4")
    # A tokenizer with more ids than the model's embedding is not the model's tokenizer.
    big = train_char_tokenizer("".join(chr(0x100 + i) for i in range(200)))
    big.save(tmp_path / "bigtok")
    with pytest.raises(ValueError, match="200 ids but the model's embedding has only"):
        import_hf(notok, tmp_path / "out5", tokenizer_dir=tmp_path / "bigtok")


def test_plain_safetensors_and_bfloat16_export(tokenizers, tmp_path):
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import load_file

    tok = tokenizers["char"]
    m = ModelConfig(
        family="llama", n_layer=1, n_head=2, d_model=16, seq_len=8, max_seq_len=8, vocab_size=tok.vocab_size
    )
    cfg = Config(run_dir=str(tmp_path / "run"), model=m, tokenizer=TokenizerConfig(kind="char"))
    params = _random_params(m, 3)
    write_params_run(tmp_path / "run", cfg, tok, params)

    run_export(tmp_path / "run", tmp_path / "plain", fmt="safetensors")
    loaded = load_file(str(tmp_path / "plain" / "model.safetensors"))
    expected = flatten_dict(params, sep="/")
    assert sorted(loaded) == sorted(expected) and "blocks/attn/q" in loaded
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert (tmp_path / "plain" / "config.yaml").is_file() and (tmp_path / "plain" / "tokenizer").is_dir()

    run_export(tmp_path / "run", tmp_path / "bf16", dtype="bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    np.testing.assert_allclose(
        hf.model.embed_tokens.weight.detach().float().numpy(), params["embed"], rtol=1e-2, atol=1e-2
    )
    with pytest.raises(ValueError, match="not empty"):
        run_export(tmp_path / "run", tmp_path / "bf16")


def test_encoder_exports_as_eurobert_and_imports_back(text, tmp_path):
    """A masked-LM (bidirectional llama) run is EuroBertForMaskedLM: logits within 1e-4 on a sentence with
    [MASK], the same top-5 fills, and import-hf gives back the same parameters as an mlm run."""
    from flaxpod.data.tokenizer import MASK_TOKEN

    tok = train_sentencepiece([text], 300, user_defined_symbols=[MASK_TOKEN])
    m = ModelConfig(
        family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=64, vocab_size=320, bidirectional=True
    )
    cfg = Config(
        run_dir=str(tmp_path / "run"), model=m, tokenizer=TokenizerConfig(), train=TrainConfig(objective="mlm")
    )
    write_params_run(tmp_path / "run", cfg, tok, _random_params(m, seed=3), step=5)
    run_export(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf).__name__ == "EuroBertForMaskedLM"
    mask_id = tok.token_id(MASK_TOKEN)
    assert hf.config.mask_token_id == mask_id
    ids = tok.encode(text[:120])[:30]
    ids[5] = ids[17] = mask_id
    run = load_run(tmp_path / "run", mesh=single_device_mesh())
    ours = _ours_logits(run, ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.std(ours) > 0.5
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    # Bidirectional: changing the last token changes the first position's logits (a causal model's would not).
    changed = _ours_logits(run, ids[:-1] + [ids[-1] + 1])
    assert np.abs(changed[0] - ours[0]).max() > 1e-3
    assert [np.argsort(-ours[t])[:5].tolist() for t in (5, 17)] == [
        np.argsort(-theirs[t])[:5].tolist() for t in (5, 17)
    ]

    back = load_run(import_hf(tmp_path / "hf", tmp_path / "back"), mesh=single_device_mesh())
    assert back.cfg.model.bidirectional and back.cfg.train.objective == "mlm"
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
