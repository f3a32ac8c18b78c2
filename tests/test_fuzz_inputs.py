"""Seeded fuzzing of what users point flaxpod at (issue 10): random mutations of a valid config
YAML fed to `flaxpod pretrain`, of a run's config.yaml fed to `flaxpod evaluate`, and of a Hugging
Face directory's config.json and model.safetensors.index.json fed to `flaxpod import-hf`.

Every case must end in exit 0, or exactly one `error: ...` line on stderr with exit 2 or 4, and
no file outside the command's own output directory may change (the inputs included). Counts are
bounded and the seeds fixed, so a failure names a reproducible case.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from flaxpod.data.tokenizer import train_char_tokenizer
from flaxpod.train.cli import main as cli_main
from flaxpod.train.config import Config, ModelConfig, TokenizerConfig
from flaxpod.train.export import export_hf
from flaxpod.train.run_dir import write_params_run
from flaxpod.train.state import abstract_model

from tests.helpers import write_corpus

TEXT = "the cat sat on the mat. a dog ran to the sun.\n" * 20
ODD_VALUES: list[Any] = [-1, 0, 3, 2.5, math.nan, "x", "", None, True, [], [1, "a"], {}, {"k": 1}]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (skip is not None and p.is_relative_to(skip)):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_outcome(rc: int, err: str, case: str) -> None:
    if rc == 0:
        return
    lines = err.strip().splitlines()
    assert rc in (2, 4), f"{case}: exit {rc}\n{err[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: stderr is not one error line:\n{err[-3000:]}"


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths to every value of a nested dict/list."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


def mutate_tree(tree: Any, rng: random.Random) -> Any:
    """One random edit: a value replaced by an odd one, a key deleted, an unknown key added, or a
    section replaced by a scalar."""
    tree = json.loads(json.dumps(tree))
    paths = _paths(tree)
    path = paths[rng.randrange(len(paths))]
    parent = tree
    for part in path[:-1]:
        parent = parent[part]
    kind = rng.choice(["value", "value", "delete", "add", "scalar"])
    if kind == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif kind == "add" and isinstance(parent, dict):
        parent[rng.choice(["unknwn", "n_layers", "vocab"])] = rng.choice(ODD_VALUES)
    else:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    return tree


def mutate_text(text: str, rng: random.Random) -> str:
    """Damage to the bytes: truncated, a character replaced, or a line dropped."""
    kind = rng.choice(["truncate", "char", "line"])
    if kind == "truncate":
        return text[: rng.randrange(len(text))]
    if kind == "char":
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(["{", "]", ":", "\t", "'", "\x00", "é", "-"]) + text[i + 1 :]
    lines = text.splitlines(keepends=True)
    del lines[rng.randrange(len(lines))]
    return "".join(lines)


# ---------------------------------------------------------------------------------------------
# pretrain CONFIG.yaml

BASE_CONFIG = {
    "seed": 0,
    "model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16},
    "tokenizer": {"kind": "char"},
    "data": {"batch_size": 8, "val_fraction": 0.1},
    "optim": {"lr": 1e-3, "warmup_steps": 1},
    "train": {"steps": 1, "log_every": 1, "eval_every": 0, "eval_steps": 1},
    "checkpoint": {"every": 0, "keep": 1},
    "logging": {"tensorboard": False},
}


def test_fuzz_pretrain_config(tmp_path, monkeypatch, capsys):
    """Mutated config files: the run directory and data path are given on the command line, so
    no mutation can send the run elsewhere; the files around it must stay as they were."""
    corpus = write_corpus(tmp_path / "data" / "corpus.txt", 3000)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    rng = random.Random(10)
    for i in range(18):
        text = yaml.safe_dump(BASE_CONFIG)
        text = yaml.safe_dump(mutate_tree(BASE_CONFIG, rng)) if i % 3 else mutate_text(text, rng)
        config = tmp_path / f"config{i}.yaml"
        config.write_text(text)
        run_dir = tmp_path / "runs" / str(i)
        before = snapshot(tmp_path, skip=tmp_path / "runs")
        args = ["pretrain", str(config), f"run_dir={run_dir}", f"data.path={corpus}", "train.steps=1", "mesh.data=-1"]
        rc = cli_main(args)
        check_outcome(rc, capsys.readouterr().err, f"case {i}: {text!r}")
        assert snapshot(tmp_path, skip=tmp_path / "runs") == before, f"case {i}: files outside the run changed"


# ---------------------------------------------------------------------------------------------
# evaluate RUN_DIR (the run's own config.yaml damaged)


@pytest.fixture(scope="module")
def params_run(tmp_path_factory):
    tok = train_char_tokenizer(TEXT)
    m = ModelConfig(family="llama", n_layer=1, n_head=2, n_kv_head=1, d_model=16, seq_len=16, vocab_size=32)
    _, abstract = abstract_model(m)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), nnx.to_pure_dict(abstract))
    path = tmp_path_factory.mktemp("fuzz") / "run"
    cfg = Config(run_dir=str(path), model=m, tokenizer=TokenizerConfig(kind="char"))
    write_params_run(path, cfg, tok, params)
    return path, cfg, tok, params


def test_fuzz_run_config_yaml_for_readers(tmp_path, params_run, capsys):
    src, *_ = params_run
    held = tmp_path / "held.txt"
    held.write_text(TEXT[:60])
    original = (src / "config.yaml").read_text()
    rng = random.Random(11)
    for i in range(12):
        run = tmp_path / f"run{i}"
        shutil.copytree(src, run)
        raw = yaml.safe_load(original)
        text = yaml.safe_dump(mutate_tree(raw, rng)) if i % 2 else mutate_text(original, rng)
        (run / "config.yaml").write_text(text)
        before = snapshot(tmp_path, skip=run / "eval")
        rc = cli_main(["evaluate", str(run), "--text", str(held), "--batch-size", "2"])
        check_outcome(rc, capsys.readouterr().err, f"case {i}: {text!r}")
        assert snapshot(tmp_path, skip=run / "eval") == before, f"case {i}: files outside eval/ changed"


# ---------------------------------------------------------------------------------------------
# import-hf HF_DIR (config.json and the shard index damaged)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, params_run):
    """A Hugging Face Llama directory as `flaxpod export` writes it, its weights in 2+ shards (so
    it has model.safetensors.index.json)."""
    _, cfg, tok, params = params_run
    out = tmp_path_factory.mktemp("hf") / "hf"
    host = jax.tree.map(np.asarray, params)
    export_hf(host, cfg, tok, out, max_shard_bytes=4096)
    assert (out / "model.safetensors.index.json").is_file()
    return out


def test_fuzz_import_hf_config_and_index(tmp_path, hf_dir, capsys):
    files = {"config.json": json.loads((hf_dir / "config.json").read_text())}
    files["model.safetensors.index.json"] = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(files["model.safetensors.index.json"]["weight_map"].values()))
    (tmp_path / "outside.safetensors").write_bytes((hf_dir / shards[0]).read_bytes())
    rng = random.Random(12)
    for i in range(30):
        case_dir = tmp_path / f"hf{i}"
        shutil.copytree(hf_dir, case_dir)
        name = rng.choice(sorted(files))
        if name.endswith("index.json") and i % 3 == 0:  # shard names that lead out of the directory
            index = json.loads(json.dumps(files[name]))
            tensor = rng.choice(sorted(index["weight_map"]))
            index["weight_map"][tensor] = rng.choice(["../outside.safetensors", str(tmp_path / "outside.safetensors")])
            text = json.dumps(index)
        elif i % 4 == 1:
            text = mutate_text(json.dumps(files[name], indent=1), rng)
        else:
            text = json.dumps(mutate_tree(files[name], rng))
        (case_dir / name).write_text(text)
        out = tmp_path / f"out{i}"
        before = snapshot(tmp_path, skip=out)
        rc = cli_main(["import-hf", str(case_dir), "--out", str(out)])
        check_outcome(rc, capsys.readouterr().err, f"case {i}: {name} = {text[:400]!r}")
        assert snapshot(tmp_path, skip=out) == before, f"case {i}: files outside --out changed"
        if ".." in text or str(tmp_path / "outside") in text:
            assert rc == 2 or "outside" not in text, f"case {i}: followed a shard name out of the directory"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(num_attention_heads=0), "config.json: num_attention_heads must be a positive integer"),
        (lambda c: c.pop("hidden_size"), "config.json: missing key 'hidden_size'"),
        (lambda c: c.update(hidden_size="16"), "config.json: hidden_size must be a positive integer, got '16'"),
        (lambda c: c.clear() or c.update(architectures=1), "config.json: "),
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        ('"gpt2"', "config.json: expected a JSON object, got str"),
    ],
)
def test_import_hf_bad_config_json_is_one_line(tmp_path, hf_dir, capsys, edit, message):
    """The issue's cases: zero heads, a missing hidden_size, a string size, not a JSON object."""
    case = tmp_path / "hf"
    shutil.copytree(hf_dir, case)
    if isinstance(edit, str):
        (case / "config.json").write_text(edit)
    else:
        config = json.loads((case / "config.json").read_text())
        edit(config)
        (case / "config.json").write_text(json.dumps(config))
    assert cli_main(["import-hf", str(case), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "out").exists()


def test_import_hf_refuses_a_non_empty_out_and_shards_outside(tmp_path, hf_dir, capsys):
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("mine")
    assert cli_main(["import-hf", str(hf_dir), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and (out / "tokenizer" / "tokenizer.json").read_text() == "mine"
    case = tmp_path / "hf"
    shutil.copytree(hf_dir, case)
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (case / "inner").mkdir()
    (case / "inner" / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    index = json.loads((case / "model.safetensors.index.json").read_text())
    for bad, message in [
        ("../secret.safetensors", "is not a file name inside"),
        (str(tmp_path / "secret.safetensors"), "is not a file name inside"),
        ("inner/link.safetensors", "leads out of"),
    ]:
        first = sorted(index["weight_map"])[0]
        (case / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": {first: bad}}))
        assert cli_main(["import-hf", str(case), "--out", str(tmp_path / "new")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
