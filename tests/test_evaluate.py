"""flaxpod evaluate / generate on run directories: figures against a direct forward pass, bad input."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flaxpod.data.tokenizer import train_char_tokenizer
from flaxpod.model.errors import InputError
from flaxpod.sharding.mesh import build_mesh
from flaxpod.sharding.rules import make_rules
from flaxpod.train.checkpoint import Checkpointer
from flaxpod.train.checkpoint_files import CheckpointError
from flaxpod.train.cli import main as cli_main
from flaxpod.train.config import Config, ModelConfig, TokenizerConfig, save_config
from flaxpod.train.evaluate import (
    Choice,
    Scorer,
    _score_by_length,
    mc_metrics,
    mc_requests,
    read_mc_jsonl,
    run_evaluate,
)
from flaxpod.train.optimizer import make_optimizer
from flaxpod.train.run_dir import load_run, single_device_mesh, write_params_run
from flaxpod.train.state import abstract_model, make_layout

TEXT = "the cat sat on the mat. a dog ran to the sun, and the cat ran too!\nQ: who? A: the cat.\n" * 6
SEQ = 16


def _model_cfg(vocab: int) -> ModelConfig:
    return ModelConfig(
        family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=SEQ, max_seq_len=32, vocab_size=vocab
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A params-only run (as import-hf writes) with random weights and a char tokenizer."""
    tok = train_char_tokenizer(TEXT)
    m = _model_cfg(64)
    _, abstract = abstract_model(m)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), nnx.to_pure_dict(abstract))
    path = tmp_path_factory.mktemp("eval") / "run"
    cfg = Config(run_dir=str(path), model=m, tokenizer=TokenizerConfig(kind="char"))
    return write_params_run(path, cfg, tok, params, step=5)


@pytest.fixture(scope="module")
def reference(run_dir):
    """log p(token | everything before it in `ids`) by the plain model on one device."""
    run = load_run(run_dir, mesh=single_device_mesh())
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(run.graphdef, p)(x), axis=-1))

    def logprobs(ids: list[int]) -> np.ndarray:
        padded = ids + [0] * (32 - len(ids))
        out = np.asarray(forward(run.params, jnp.asarray([padded])))[0]
        return np.array([out[i - 1, ids[i]] for i in range(1, len(ids))], np.float64)

    return run, logprobs


def test_text_metrics_match_direct_forward(run_dir, reference, tmp_path):
    run, logprobs = reference
    (tmp_path / "held_out.txt").write_text(TEXT[:200])
    report = run_evaluate(run_dir, texts=[str(tmp_path / "held_out.txt")], batch_size=4)
    got = report["results"]["text:held_out.txt"]
    ids = run.tokenizer.encode(TEXT[:200])
    # Windows of SEQ + 1 tokens overlapping by one: every token after the first predicted once.
    nats = -sum(logprobs(ids[i : i + SEQ + 1]).sum() for i in range(0, len(ids) - 1, SEQ))
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == 199
    np.testing.assert_allclose(got["loss"], nats / (len(ids) - 1), rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(nats / (len(ids) - 1)), rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nats / math.log(2) / 199, rtol=1e-5)
    saved = json.loads((run_dir / "eval" / "step_5.json").read_text())
    assert saved["step"] == 5 and saved["results"]["text:held_out.txt"]["loss"] == got["loss"]


def test_multiple_choice_matches_direct_loglikelihoods(run_dir, reference):
    run, logprobs = reference
    rows = [
        Choice("Q: who sat on the mat? A:", ["the cat", "a dog", "the sun"], 0),
        Choice("the dog ran to", ["the sun", "the mat."], 1),
        Choice("a cat", ["sat", "ran too!", "on", "the dog"], 3),
        Choice("who ran too? the ", ["cat", "dog"], 0),  # trailing space moves into the continuation
    ]
    expected = []
    for row in rows:
        query = row.query.rstrip()
        moved = row.query[len(query) :]
        for choice in row.choices:
            ids = run.tokenizer.encode(query + moved + " " + choice)
            n_cont = len(moved) + 1 + len(choice)  # characters = tokens for the char tokenizer
            expected.append(logprobs(ids)[-n_cont:].sum())
    scorer = Scorer(run_eval := load_run(run_dir), batch_size=4)  # the run's 8-device mesh
    assert run_eval.mesh.devices.size == 8
    got = -_score_by_length(scorer, *mc_requests(run.tokenizer, rows, 32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

    acc = acc_norm = 0
    i = 0
    for row in rows:
        ll = np.array(expected[i : i + len(row.choices)])
        i += len(row.choices)
        acc += np.argmax(ll) == row.gold
        acc_norm += np.argmax(ll / np.array([len(c) for c in row.choices])) == row.gold
    metrics = mc_metrics(scorer, run.tokenizer, rows, 32)
    assert metrics["acc"] == acc / 4 and metrics["acc_norm"] == acc_norm / 4 and metrics["questions"] == 4


def test_multiple_choice_file_and_limit(run_dir, tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"query": "the cat", "choices": ["sat", "ran"], "gold": i % 2} for i in range(5)]
    rows.append({"query": "the €", "choices": ["sat", "ran"], "gold": 0})  # not encodable: skipped
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = run_evaluate(run_dir, mc=[str(path)], limit=3)
    assert report["results"]["mc:mc"]["questions"] == 3
    report = run_evaluate(run_dir, mc=[str(path)])
    assert report["results"]["mc:mc"]["questions"] == 5 and report["results"]["mc:mc"]["skipped"] == 1


def test_bad_jsonl_rows_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
    for bad, message in [
        (json.dumps({"query": "q", "choices": ["a", "b"]}), r"bad.jsonl:2: missing field 'gold'"),
        ("{not json", r"bad.jsonl:2: invalid JSON"),
        (json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}), r"bad.jsonl:2: 'gold' must be an index"),
        (json.dumps({"query": "q", "choices": "ab", "gold": 0}), r"bad.jsonl:2: 'choices' must be a list"),
    ]:
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=message):
            read_mc_jsonl(path)
    path.write_bytes(good.encode() + b"\n" + b'{"query": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 \(.* at byte 15 of the line\)"):
        read_mc_jsonl(path)


def test_results_of_a_step_are_merged_by_task(run_dir, tmp_path):
    """A --mc-only evaluation keeps the --text figures saved for the same step; a task evaluated
    again is replaced; the file is never half written."""
    out = run_dir / "eval" / "step_5.json"
    out.unlink(missing_ok=True)
    (tmp_path / "held.txt").write_text(TEXT[:100])
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"query": "the cat", "choices": ["sat", "ran"], "gold": 0}) + "\n")
    text = run_evaluate(run_dir, texts=[str(tmp_path / "held.txt")])["results"]["text:held.txt"]
    run_evaluate(run_dir, mc=[str(mc)])
    saved = json.loads(out.read_text())["results"]
    assert set(saved) == {"text:held.txt", "mc:mc"} and saved["text:held.txt"] == text
    (tmp_path / "held.txt").write_text(TEXT[:150])
    again = run_evaluate(run_dir, texts=[str(tmp_path / "held.txt")])["results"]["text:held.txt"]
    saved = json.loads(out.read_text())["results"]
    assert saved["text:held.txt"] == again != text and "mc:mc" in saved
    assert not list(out.parent.glob(".*tmp"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "{run}", "--mc", "{mc}", "--batch-size", "-5"], "--batch-size: expected a number >= 1, got -5"),
        (["evaluate", "{run}", "--mc", "{mc}", "--batch-size", "0"], "--batch-size: expected a number >= 1, got 0"),
        (["evaluate", "{run}", "--text", "{mc}", "--seq-len", "-3"], "--seq-len: expected a number >= 1"),
        (["evaluate", "{run}", "--text", "{tmp}/missing.txt"], "--text: no files match"),
        (
            ["generate", "{run}", "--prompt", "a", "--temperature", "nan"],
            "--temperature: expected a number >= 0, got nan",
        ),
        (["generate", "{run}", "--prompt", "a", "--top-p", "1.5"], "--top-p: expected a number > 0 and <= 1, got 1.5"),
        (["generate", "{run}", "--prompt", "a", "--top-p", "0"], "--top-p: expected a number > 0"),
        (["generate", "{run}", "--prompt", "a", "--top-k", "-1"], "--top-k: expected a number >= 0"),
        (["generate", "{run}", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens: expected a number >= 1"),
        (["generate", "{run}", "--prompt", "a", "--batch-size", "0"], "--batch-size: expected a number >= 1"),
        (["export", "{run}", "--out", "{tmp}/x", "--max-shard-size", "0"], "--max-shard-size: expected a number >= 1"),
        (["export", "{run}", "--out", "{tmp}/x", "--step", "-1"], "--step: expected a number >= 0, got -1"),
    ],
)
def test_numeric_options_are_checked(run_dir, tmp_path, capsys, argv, message):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"query": "the cat", "choices": ["sat", "ran"], "gold": 0}) + "\n")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    argv = [a.format(run=run_dir, mc=mc, tmp=tmp_path) for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err, err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "x").exists()


def test_damaged_newest_step_falls_back_for_every_reader(run_dir, tmp_path, capsys):
    """Bit rot in the newest checkpoint (same sizes): evaluate and generate warn in one line naming
    the step and use the previous one; --step on the damaged step says so."""
    import shutil

    from flaxpod.train.run_dir import read_run_info, save_params

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    loaded = load_run(run, mesh=single_device_mesh())
    save_params(run, 6, loaded.params, read_run_info(run)[1])
    shard = max(
        (p for p in (run / "checkpoints" / "6" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 32] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 32])
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli_main(["generate", str(run), "--prompt", "the", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "(step 5)" in captured.out
    assert captured.err.count("\n") == 1 and "checkpoint step 6" in captured.err and "SHA-256 differs" in captured.err
    assert cli_main(["evaluate", str(run), "--text", str(tmp_path / "t.txt"), "--step", "6"]) == 2
    err = capsys.readouterr().err
    assert "--text: no files match" in err  # inputs are checked before the model is read
    (tmp_path / "t.txt").write_text(TEXT[:80])
    assert cli_main(["evaluate", str(run), "--text", str(tmp_path / "t.txt"), "--step", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint step 6 in" in err and "is unusable: file params/" in err, err


def test_bad_run_directories(run_dir, tmp_path, capsys):
    with pytest.raises(InputError, match="has no config.yaml"):
        load_run(tmp_path)
    empty = tmp_path / "empty"
    cfg = Config(run_dir=str(empty), model=_model_cfg(64), tokenizer=TokenizerConfig(kind="char"))
    empty.mkdir()
    save_config(cfg, empty / "config.yaml")
    train_char_tokenizer(TEXT).save(empty / "tokenizer")
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*empty/checkpoints"):
        load_run(empty)
    with pytest.raises(CheckpointError, match=r"no checkpoint step 9 in .* usable steps: \[5\]"):
        load_run(run_dir, step=9)
    other = tmp_path / "other"
    write_params_run(other, cfg, train_char_tokenizer(TEXT), load_run(run_dir, mesh=single_device_mesh()).params)
    train_char_tokenizer("".join(chr(0x100 + i) for i in range(70))).save(other / "tokenizer")
    with pytest.raises(ValueError, match="tokenizer has 70 ids but the model's embedding has only"):
        load_run(other)
    # The CLI turns these into one line and exit code 2.
    assert cli_main(["evaluate", str(run_dir), "--step", "9", "--val"]) == 2
    assert "error: no checkpoint step 9" in capsys.readouterr().err


def test_training_checkpoint_from_another_mesh(tmp_path):
    """A full train state (params + optimizer state) written sharded over a 2x2x2 mesh restores
    params-only onto one device."""
    tok = train_char_tokenizer(TEXT)
    cfg = Config(run_dir=str(tmp_path), model=_model_cfg(64), tokenizer=TokenizerConfig(kind="char"))
    tx, _ = make_optimizer(cfg.optim, 10)
    mesh = build_mesh(2, 2, 2)
    layout = make_layout(cfg.model, tx, mesh, make_rules("fsdp_tp"))
    rng = np.random.default_rng(1)  # random values in every leaf, placed on their shards (init_state compiles slowly)
    state = jax.tree.map(
        lambda s, sh: jax.device_put(rng.normal(size=s.shape).astype(s.dtype), sh), layout.shapes, layout.shardings
    )
    checkpointer = Checkpointer(tmp_path, keep=2, async_save=False)
    checkpointer.save(3, state, None)
    checkpointer.close()
    save_config(cfg, tmp_path / "config.yaml")
    tok.save(tmp_path / "tokenizer")
    run = load_run(tmp_path, mesh=single_device_mesh())
    assert run.step == 3
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_cli(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\na dog\\nran\n")
    assert (
        cli_main(
            [
                "generate",
                str(run_dir),
                "--prompt",
                "Q: who",
                "--prompts-file",
                str(prompts),
                "--max-new-tokens",
                "6",
                "--temperature",
                "0.7",
                "--top-k",
                "5",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 3 and "a dog\nran" in out
    assert cli_main(["generate", str(run_dir), "--prompt", "€uro"]) == 2
    assert "prompt 1: char tokenizer: character '€'" in capsys.readouterr().err
