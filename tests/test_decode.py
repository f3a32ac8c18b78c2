"""KV-cache decoding against recomputing the whole sequence, batching, stopping and sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flaxpod.model.decode import Sampling, check_lengths, left_pad, make_generate, sample_token
from flaxpod.train.config import ModelConfig
from flaxpod.train.state import abstract_model

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [7, 8], [9, 10, 11, 12]]
HOT = Sampling(temperature=0.8, top_k=8, top_p=0.9)


def random_model(family: str, n_kv_head: int = 0, vocab: int = 40):
    """(graphdef, params) with random values everywhere (biases and norms too), built from the
    abstract shapes without running the initializers: fast and input-sensitive."""
    cfg = ModelConfig(
        family=family,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=32,
        seq_len=32,
        max_seq_len=32,
        vocab_size=vocab,
    )
    graphdef, abstract = abstract_model(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), nnx.to_pure_dict(abstract))
    return graphdef, params


@pytest.fixture(scope="module", params=[("gpt2", 0), ("llama", 2)], ids=["gpt2", "llama-gqa"])
def model(request):
    graphdef, params = random_model(*request.param)
    tokens, lengths = left_pad(PROMPTS)
    key = jax.random.key(3)
    out, gens = {}, {}
    for name, sampling in (("greedy", Sampling()), ("hot", HOT)):
        for cache in (True, False):
            gens[name, cache] = make_generate(graphdef, max_new_tokens=8, sampling=sampling, use_cache=cache)
            out[name, cache] = gens[name, cache](params, tokens, lengths, key)
    return graphdef, params, out, gens


@pytest.mark.parametrize("name", ["greedy", "hot"])
def test_cache_matches_recomputation(model, name):
    _, _, out, _ = model
    np.testing.assert_array_equal(out[name, True][0], out[name, False][0])
    np.testing.assert_array_equal(out[name, True][1], [8, 8, 8])
    # Not a degenerate repetition: the continuations differ between prompts.
    assert len({tuple(r) for r in np.asarray(out[name, True][0]).tolist()}) >= 2


def test_greedy_is_argmax_of_full_forward_for_every_padded_row(model):
    graphdef, params, out, _ = model
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    for row, prompt in enumerate(PROMPTS):
        # The plain model on the unpadded prompt, one token at a time; right-padding to a fixed
        # width changes nothing at earlier positions (causal) and compiles once.
        seq = list(prompt)
        for _ in range(8):
            logits = forward(params, jnp.asarray([seq + [0] * (16 - len(seq))]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert np.asarray(out["greedy", True][0][row]).tolist() == seq[len(prompt) :]


def test_eos_counts_top_k_one_and_vocab_limit():
    graphdef, params = random_model("gpt2")
    tokens, lengths = left_pad(PROMPTS)
    free, _ = make_generate(graphdef, max_new_tokens=8)(params, tokens, lengths, jax.random.key(0))
    eos = int(free[0, 3])  # row 0 produces this id at step 3: make it the end of sequence
    out, counts = make_generate(graphdef, max_new_tokens=8, eos_id=eos)(params, tokens, lengths, jax.random.key(0))
    out, free = np.asarray(out), np.asarray(free)
    for r in range(3):
        hits = np.flatnonzero(free[r] == eos)
        n = int(hits[0]) if len(hits) else 8
        assert counts[r] == n
        np.testing.assert_array_equal(out[r, :n], free[r, :n])
        assert (out[r, n:] == 0).all()
    assert counts[0] <= 3
    top1 = make_generate(graphdef, max_new_tokens=8, sampling=Sampling(temperature=5.0, top_k=1))
    np.testing.assert_array_equal(top1(params, tokens, lengths, jax.random.key(9))[0], free)
    limited = make_generate(graphdef, max_new_tokens=8, sampling=Sampling(temperature=5.0), vocab_limit=5)
    assert int(np.max(limited(params, tokens, lengths, jax.random.key(0))[0])) < 5


def test_seed_repeatable(model):
    _, params, out, gens = model
    tokens, lengths = left_pad(PROMPTS)
    hot = gens["hot", True]
    np.testing.assert_array_equal(hot(params, tokens, lengths, jax.random.key(3))[0], out["hot", True][0])
    assert (np.asarray(hot(params, tokens, lengths, jax.random.key(4))[0]) != np.asarray(out["hot", True][0])).any()


def test_top_p_and_top_k_sets():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)

    def draws(sampling):
        return np.asarray(jax.vmap(lambda k: sample_token(logits, k, sampling))(keys))[:, 0]

    assert set(draws(Sampling(temperature=1.0, top_p=0.7)).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(Sampling(temperature=1.0, top_p=0.5)).tolist()) == {0}
    assert set(draws(Sampling(temperature=1.0, top_k=3)).tolist()) == {0, 1, 2}
    counts = np.bincount(draws(Sampling(temperature=1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_bad_requests():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="prompt 1: empty"):
        left_pad([[1], []])
    cfg = ModelConfig(family="gpt2", seq_len=32, max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        check_lengths(cfg, 30, 3)
    check_lengths(ModelConfig(family="llama", seq_len=32, max_seq_len=32), 30, 3)  # RoPE: no hard limit
