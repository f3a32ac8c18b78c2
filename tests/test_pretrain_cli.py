"""`flaxpod pretrain` end to end: the run directory, resume, learning, and bad input."""

from __future__ import annotations

import json

import pytest
from flaxpod.train.config import load_config, save_config

from tests.helpers import REPO, run_cli, tiny_overrides, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n_chars=30_000)


@pytest.mark.slow
def test_run_directory_and_resume(tmp_path, corpus):
    run_dir = tmp_path / "run"
    first = run_cli(["pretrain", "configs/tiny.yaml", *tiny_overrides(run_dir, corpus, **{"mesh.fsdp": 2})])
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "tokenizer/tokenizer.json", "checkpoints/3", "checkpoints/6"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert all(isinstance(r[key], float) for r in train_rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert "eta" in first.stdout and "tok/s" in first.stdout

    # The same command with more steps resumes from step 6 instead of starting over.
    second = run_cli(
        ["pretrain", "configs/tiny.yaml", *tiny_overrides(run_dir, corpus, **{"mesh.fsdp": 2, "train.steps": 8})]
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "checkpoints/6" in second.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8]
    assert (run_dir / "checkpoints" / "8").exists()


@pytest.mark.slow
def test_training_lowers_the_loss(tmp_path, corpus):
    run_dir = tmp_path / "learn"
    overrides = tiny_overrides(
        run_dir, corpus, **{"train.steps": 60, "train.log_every": 10, "train.eval_every": 60, "optim.lr": 0.01}
    )
    result = run_cli(["pretrain", "configs/tiny.yaml", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    # A uniform guess over the ~45-character vocabulary costs ln(45) = 3.8 nats.
    assert losses[0] > 3.0 and losses[-1] < 2.6, losses
    assert val[-1] < 2.6, val


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"data.path": "{tmp}/nothing_here.txt"}, "data.path: no files match"),
        ({"data.path": "{tmp}/empty.txt"}, "is empty"),
        ({"model.n_layr": 2}, "unknown config key 'model.n_layr'; did you mean 'model.n_layer'?"),
        ({"model.d_model": "wide"}, "model.d_model: expected int, got str 'wide'"),
        ({"mesh.data": 3}, "mesh: data*fsdp*tensor = 3*1*1 = 3 does not match the 8 devices"),
        ({"mesh.data": -1, "mesh.fsdp": 3}, "mesh: 8 devices cannot be split as data=-1 fsdp=3"),
        ({"mesh.data": 2, "mesh.fsdp": 2}, "does not match the 8 devices"),
        ({"data.batch_size": 12}, "data.batch_size: 12 (micro-batch 12 with train.grad_accum=1) is not divisible"),
        ({"model.seq_len": 64, "model.max_seq_len": 32}, "model.seq_len: 64 exceeds the model's maximum"),
    ],
)
def test_bad_input_one_line_and_nothing_overwritten(tmp_path, corpus, extra, message):
    (tmp_path / "empty.txt").write_text("")
    run_dir = tmp_path / "existing"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("precious: true\n")
    extra = {k: str(v).replace("{tmp}", str(tmp_path)) for k, v in extra.items()}
    result = run_cli(["pretrain", "configs/tiny.yaml", *tiny_overrides(run_dir, corpus, **extra)])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    assert message in result.stderr
    assert (run_dir / "config.yaml").read_text() == "precious: true\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_changed_model_does_not_overwrite_run(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = load_config(REPO / "configs/tiny.yaml", tiny_overrides(run_dir, corpus, **{"model.n_layer": 7}))
    save_config(earlier, run_dir / "config.yaml")
    saved = (run_dir / "config.yaml").read_text()
    result = run_cli(["pretrain", "configs/tiny.yaml", *tiny_overrides(run_dir, corpus)])
    assert result.returncode == 2
    assert "model.n_layer: 2 differs from 7 in the existing run" in result.stderr
    assert (run_dir / "config.yaml").read_text() == saved


def test_unknown_subcommand_and_help():
    result = run_cli(["pretrian"])
    assert result.returncode == 2 and "did you mean 'pretrain'?" in result.stderr
    assert run_cli(["--help"]).returncode == 0
