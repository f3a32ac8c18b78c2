"""`flaxpod prepare` then `flaxpod pretrain` on the shards: packed rows train, mismatched tokenizers are refused."""

from __future__ import annotations

import json

import pytest
from flaxpod.data.tokenizer import train_char_tokenizer

from tests.helpers import run_cli, tiny_overrides, write_corpus


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    docs = root / "docs"
    for i in range(24):  # many small documents, so rows pack several with segment ids
        write_corpus(docs / f"doc{i:02d}.txt", n_chars=1500, seed=i)
    out = root / "ds"
    result = run_cli(
        ["prepare", str(docs), "--out", str(out), "--vocab-size", "320", "--val-fraction", "0.2", "--no-progress"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_pretrain_on_prepared_shards(tmp_path, dataset):
    meta = json.loads((dataset / "metadata.json").read_text())
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        run_dir,
        dataset,
        **{"tokenizer.kind": "sentencepiece", "train.steps": 30, "train.eval_every": 15, "optim.lr": 0.01},
    )
    result = run_cli(["pretrain", "configs/tiny.yaml", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared dataset(s)" in result.stdout and f"{meta['documents']:,} documents" in result.stdout
    # The run keeps the dataset's tokenizer, byte for byte.
    assert (run_dir / "tokenizer" / "tokenizer.model").read_bytes() == (
        dataset / "tokenizer" / "tokenizer.model"
    ).read_bytes()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] - 0.3, val

    # evaluate reads the same held-out documents through --dataset and through the run's --val.
    result = run_cli(["evaluate", str(run_dir), "--dataset", str(dataset), "--val"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "eval" / "step_30.json").read_text())["results"]
    by_dataset, by_val = report[f"dataset:{dataset.name}"], report["val"]
    assert by_dataset == by_val
    assert by_dataset["tokens"] == meta["splits"]["val"]["tokens"] - 1
    assert 0 < by_dataset["loss"] < 5.77  # below a uniform guess over 320 ids


def test_tokenizer_mismatch_is_refused(tmp_path, dataset):
    other = tmp_path / "other_tokenizer"
    train_char_tokenizer("abc def").save(other)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, dataset, **{"tokenizer.path": str(other)})
    result = run_cli(["pretrain", "configs/tiny.yaml", *overrides])
    assert result.returncode == 2
    meta = json.loads((dataset / "metadata.json").read_text())
    assert meta["tokenizer"]["fingerprint"] in result.stderr
    assert train_char_tokenizer("abc def").fingerprint() in result.stderr
    assert not run_dir.exists()
