"""Masked-LM pretraining (train.objective=mlm): the bidirectional mask, BERT masking, the [MASK] token,
the objective's numbers, and the CLI end to end (pretrain, evaluate, fill-mask, generate refused)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flaxpod.data.tokenizer import MASK_TOKEN, train_char_tokenizer, train_sentencepiece
from flaxpod.model.config import ModelConfig
from flaxpod.model.errors import ConfigError
from flaxpod.model.layers import attention_mask
from flaxpod.model.transformer import Transformer
from flaxpod.train.config import Config, MlmConfig, TrainConfig
from flaxpod.train.mlm import MaskedLM, mask_token_id, special_token_ids

from tests.helpers import REPO, run_cli, tiny_overrides, write_corpus


def test_bidirectional_mask_keeps_documents_apart():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    got = np.asarray(attention_mask(seg, 5, causal=False))[0]
    expected = np.array(
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], bool
    )  # by hand: same segment, both directions
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(attention_mask(None, 3, causal=False)), np.ones((1, 3, 3), bool))
    causal = np.asarray(attention_mask(seg, 5))[0]
    np.testing.assert_array_equal(causal, expected & np.tril(np.ones((5, 5), bool)))


def test_bidirectional_model_sees_the_future_but_not_other_documents():
    cfg = ModelConfig(family="llama", n_layer=2, n_head=2, d_model=32, seq_len=8, vocab_size=64, bidirectional=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]])
    base = np.asarray(model(tokens, segment_ids=seg, positions=pos))
    future = np.asarray(model(tokens.at[0, 3].set(20), segment_ids=seg, positions=pos))
    other_doc = np.asarray(model(tokens.at[0, 6].set(20), segment_ids=seg, positions=pos))
    assert np.abs(future[0, 0] - base[0, 0]).max() > 1e-4  # position 0 sees position 3
    np.testing.assert_array_equal(other_doc[0, :4], base[0, :4])  # document 1 never sees document 2


def _objective(vocab: int = 200, **mlm) -> MaskedLM:
    return MaskedLM(mask_id=4, special_ids=[0, 1, 2, 3, 4], text_vocab=vocab, model_vocab=vocab, mlm=MlmConfig(**mlm))


def test_masking_follows_bert_proportions_and_is_a_pure_function_of_the_key():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 200, (64, 256)).astype(np.int32)
    tokens[:, :3] = [2, 3, 0]  # special ids are never selected
    seg = np.ones_like(tokens)
    seg[:, -40:] = 0  # padding is never selected
    batch = {"inputs": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}
    obj = _objective()
    out = jax.tree.map(np.asarray, obj.prepare(batch, jax.random.key(7)))
    sel = out["loss_mask"]
    eligible = (seg > 0) & (tokens >= 5)
    assert not sel[~eligible].any()
    assert abs(sel[eligible].mean() - 0.15) < 0.01  # 14k eligible tokens: 3 sigma is 0.009
    np.testing.assert_array_equal(out["targets"], tokens)
    np.testing.assert_array_equal(out["inputs"][~sel], tokens[~sel])  # unselected tokens untouched
    masked = out["inputs"][sel] == 4
    kept = out["inputs"][sel] == tokens[sel]
    assert abs(masked.mean() - 0.8) < 0.03
    assert abs(kept.mean() - (0.1 + 0.1 / 195)) < 0.02  # 10% kept, plus random draws of the same token
    assert abs((~masked & ~kept).mean() - 0.1 * 194 / 195) < 0.02
    again = jax.tree.map(np.asarray, obj.prepare(batch, jax.random.key(7)))
    np.testing.assert_array_equal(again["inputs"], out["inputs"])
    other = np.asarray(obj.prepare(batch, jax.random.key(8))["loss_mask"])
    assert (other != sel).any()
    all_masked = np.asarray(
        _objective(mask_fraction=1.0, random_fraction=0.0).prepare(batch, jax.random.key(7))["inputs"]
    )
    assert (all_masked[sel] == 4).all()


def test_loss_and_accuracy_match_numpy_on_the_selected_tokens():
    cfg = ModelConfig(family="llama", n_layer=1, n_head=2, d_model=32, seq_len=16, vocab_size=200, bidirectional=True)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    tokens = np.random.default_rng(1).integers(5, 200, (4, 16)).astype(np.int32)
    obj = _objective(mask_prob=0.5)
    batch = obj.prepare({"inputs": jnp.asarray(tokens)}, jax.random.key(3))
    loss_sum, sums = obj.loss_sums(model, batch, None)
    logits = np.asarray(model(batch["inputs"]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    sel = np.asarray(batch["loss_mask"])
    nll = -np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    assert sel.sum() > 10
    np.testing.assert_allclose(float(loss_sum), nll[sel].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["accuracy"]), (logits.argmax(-1) == tokens)[sel].sum())
    assert float(obj.weight(batch)) == sel.sum()


def test_mask_token_is_a_user_defined_sentencepiece_symbol_and_required():
    text = " ".join(["the cat sat on the mat and the dog ran"] * 300)
    tok = train_sentencepiece([text], 300, user_defined_symbols=[MASK_TOKEN])
    mask = mask_token_id(tok)
    assert tok.encode("the[MASK] sat").count(mask) == 1
    assert {0, 1, 2, 3, mask} <= set(special_token_ids(tok))
    assert not set(special_token_ids(tok)) & set(tok.encode("the cat sat"))
    with pytest.raises(ConfigError, match=r"\[MASK\]"):
        mask_token_id(train_sentencepiece([text], 300))
    with pytest.raises(ConfigError, match=r"\[MASK\]"):
        mask_token_id(train_char_tokenizer(text))


def test_config_choices():
    with pytest.raises(ConfigError, match="train.objective"):
        Config(train=TrainConfig(objective="bert"))
    with pytest.raises(ConfigError, match="mlm.random_fraction"):
        Config(mlm=MlmConfig(mask_fraction=0.9, random_fraction=0.2))
    with pytest.raises(ConfigError, match="model.bidirectional"):
        Config(model=ModelConfig(bidirectional=True))


@pytest.mark.slow
def test_mlm_pretrain_evaluate_fill_mask_end_to_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 60_000)
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, corpus, **{"tokenizer.kind": "sentencepiece", "tokenizer.vocab_size": 400})
    args += ["model.family=llama", "train.objective=mlm", "train.steps=30", "train.eval_every=30", "optim.lr=3e-3"]
    done = run_cli(["pretrain", str(REPO / "configs" / "tiny.yaml"), *args])
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "accuracy" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    assert 0 < train_rows[-1]["accuracy"] <= 1
    assert any("val_accuracy" in r for r in rows)

    held = write_corpus(tmp_path / "held.txt", 3000, seed=5)
    ev = run_cli(["evaluate", str(run_dir), "--text", str(held), "--pll", "--limit", "1"], devices=1)
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads((run_dir / "eval" / "step_30.json").read_text())["results"]
    assert 0 <= report["text:held.txt"]["masked_accuracy"] <= 1 and report["text:held.txt"]["mask_seed"] == 0
    assert report["pll:held.txt"]["pll"] < 0

    fill = run_cli(["fill-mask", str(run_dir), "--text", "The [MASK] said.", "--top-k", "3"], devices=1)
    assert fill.returncode == 0 and fill.stdout.count("[MASK] 1:") == 1, fill.stderr[-2000:]
    gen = run_cli(["generate", str(run_dir), "--prompt", "The"], devices=1)
    assert gen.returncode == 2 and gen.stderr.strip().count("\n") == 0 and "fill-mask" in gen.stderr


def test_mlm_makes_the_model_bidirectional_and_pools_mean():
    from flaxpod.train.mlm import with_objective_model

    cfg = with_objective_model(Config(train=TrainConfig(objective="mlm")))
    assert cfg.model.bidirectional and cfg.model.pooling == "mean"
    first = with_objective_model(Config(train=TrainConfig(objective="mlm"), model=ModelConfig(pooling="first")))
    assert first.model.pooling == "first"
    assert with_objective_model(Config()).model == ModelConfig()
