"""train/data_source.py: text vs prepared detection, mixture-weight errors, data.max_bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from flaxpod.data.prepare import prepare_dataset
from flaxpod.data.tokenizer import CharTokenizer
from flaxpod.train.config import ConfigError, load_config
from flaxpod.train.data_source import is_prepared, load_run_data, truncate_documents


def _config(tmp_path, path: str, *extra: str):
    return load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.path={path}",
            "tokenizer.kind=char",
            "model.seq_len=8",
            "data.batch_size=2",
            "train.eval_steps=1",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two tiny prepared datasets sharing one char tokenizer."""
    base = tmp_path_factory.mktemp("prepared")
    tok = CharTokenizer(sorted("abcdefgh "))
    tok.save(base / "tok")
    out = []
    for name in ("one", "two"):
        (base / name).mkdir()
        for i in range(10):
            (base / name / f"{i}.txt").write_text("abc defg hab " * (i + 3))
        prepare_dataset(
            [str(base / name)], base / f"ds_{name}", tokenizer=base / "tok", val_fraction=0.5, workers=1, progress=False
        )
        out.append(str(base / f"ds_{name}"))
    return out


def test_prepared_only_when_every_entry_is_a_prepared_dataset(tmp_path, prepared):
    text = tmp_path / "a.txt"
    text.write_text("abc")
    assert is_prepared(prepared)
    assert not is_prepared([prepared[0], str(text)])
    assert not is_prepared([str(tmp_path)])  # a directory of text files
    assert not is_prepared([])


def test_prepared_data_loads_with_matching_weights(tmp_path, prepared):
    data = load_run_data(_config(tmp_path, ",".join(prepared), "data.weights=0.25,0.75"), tmp_path / "run")
    assert "2 prepared dataset(s)" in data.description
    assert data.eval_batches and data.eval_batches[0]["inputs"].shape == (2, 8)


def test_mixture_weight_errors(tmp_path, prepared):
    with pytest.raises(ConfigError, match="data.weights: 3 weights for 2 datasets in data.path"):
        load_run_data(_config(tmp_path, ",".join(prepared), "data.weights=0.2,0.3,0.5"), tmp_path / "run")
    text = tmp_path / "a.txt"
    text.write_text("abc " * 200)
    with pytest.raises(ConfigError, match="data.weights: mixture weights need prepared datasets"):
        load_run_data(_config(tmp_path, str(text), "data.weights=[1.0]"), tmp_path / "run")


def test_max_bytes_truncates_the_text_corpus(tmp_path):
    assert truncate_documents(["abcdef", "ghij", "klm"], 8) == ["abcdef", "gh"]
    assert truncate_documents(["abc"], 10) == ["abc"]
    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "1.txt").write_text("abcd " * 100)  # 500 characters
    (corpus / "2.txt").write_text("xyz! " * 100)  # never reached
    data = load_run_data(_config(tmp_path, str(corpus), "data.max_bytes=300", "data.val_fraction=0.2"), tmp_path / "r")
    assert "300 characters" in data.description
    assert sorted(data.tokenizer.decode(list(range(data.tokenizer.vocab_size)))) == sorted("abcd ")


def test_tokenizer_saved_with_the_run_wins_over_tokenizer_path(tmp_path, prepared):
    corpus = tmp_path / "a.txt"
    corpus.write_text("abc cab " * 50)
    run = tmp_path / "run"
    fresh = load_run_data(_config(tmp_path, str(corpus)), run)  # trained here: the characters of the corpus
    assert fresh.tokenizer.vocab_size == len(set("abc "))
    given = Path(prepared[0]).parent / "tok"
    assert load_run_data(_config(tmp_path, str(corpus), f"tokenizer.path={given}"), run).tokenizer.vocab_size == 9
    fresh.tokenizer.save(run / "tokenizer")  # as the loop does
    resumed = load_run_data(_config(tmp_path, str(corpus), f"tokenizer.path={given}"), run)
    assert resumed.tokenizer.fingerprint() == fresh.tokenizer.fingerprint()
    with pytest.raises(FileNotFoundError, match="tokenizer.path '/nowhere': no such directory"):
        load_run_data(_config(tmp_path, str(corpus), "tokenizer.path=/nowhere"), tmp_path / "other")
