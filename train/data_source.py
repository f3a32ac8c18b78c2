"""Training data for a run: text files (tokenized in-process) or prepared ArrayRecord datasets.

`data.path` names prepared datasets when every comma-separated entry is a directory holding a
`metadata.json` (written by `flaxpod prepare`); anything else is read as text. Either way the
result is a checkpointable iterator of this process's rows and a fixed list of eval batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flaxpod.data.pipeline import make_eval_batches, make_train_iterator, split_tokens, tokenize_corpus
from flaxpod.data.prepared import load_dataset_metadata, make_packed_eval_batches, make_packed_train_iterator
from flaxpod.data.text import read_corpus, resolve_text_paths
from flaxpod.data.tokenizer import MASK_TOKEN, Tokenizer, load_tokenizer
from flaxpod.data.tokenizer_training import saved_or_given_tokenizer, train_tokenizer_on_texts
from flaxpod.train.config import Config, ConfigError


@dataclass
class RunData:
    tokenizer: Tokenizer
    train_iter: Any  # a Grain iterator with get_state() / set_state()
    eval_batches: list[dict[str, np.ndarray]]
    description: str


def data_paths(cfg: Config) -> list[str]:
    return [p.strip() for p in cfg.data.path.split(",") if p.strip()]


def is_prepared(paths: list[str]) -> bool:
    return bool(paths) and all((Path(p) / "metadata.json").is_file() for p in paths)


def _saved_or_configured_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer | None:
    return saved_or_given_tokenizer(run_dir / "tokenizer", cfg.tokenizer.path, "tokenizer.path")


def load_run_data(cfg: Config, run_dir: Path) -> RunData:
    paths = data_paths(cfg)
    if is_prepared(paths):
        return _prepared_data(cfg, run_dir, paths)
    if cfg.data.weights:
        raise ConfigError("data.weights: mixture weights need prepared datasets (flaxpod prepare) in data.path")
    return _text_data(cfg, run_dir, paths)


def _split_rows(cfg: Config) -> dict[str, int]:
    return {
        "seq_len": cfg.model.seq_len,
        "global_batch_size": cfg.data.batch_size,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
    }


def _text_data(cfg: Config, run_dir: Path, paths: list[str]) -> RunData:
    corpus = read_corpus(resolve_text_paths(paths))
    if cfg.data.max_bytes:
        corpus.documents = truncate_documents(corpus.documents, cfg.data.max_bytes)
    # A tokenizer trained here is saved with the run by the loop.
    tokenizer = _saved_or_configured_tokenizer(cfg, run_dir) or train_tokenizer_on_texts(
        cfg.tokenizer.kind,
        corpus.documents,
        vocab_size=cfg.tokenizer.vocab_size,
        model_type=cfg.tokenizer.model_type,
        special_tokens=(MASK_TOKEN,) if cfg.train.objective == "mlm" else (),
    )
    tokens = tokenize_corpus(corpus, tokenizer)
    train_tokens, val_tokens = split_tokens(
        tokens, cfg.data.val_fraction, seq_len=cfg.model.seq_len, data_path=cfg.data.path
    )
    rows = _split_rows(cfg)
    train_iter = make_train_iterator(
        train_tokens, seed=cfg.seed, stride=cfg.data.window_stride or cfg.model.seq_len, **rows
    )
    eval_batches = make_eval_batches(val_tokens, num_batches=cfg.train.eval_steps, **rows)
    chars = sum(len(d) for d in corpus.documents)
    description = (
        f"{len(corpus.paths)} files, {chars:,} characters, {len(tokens):,} tokens "
        f"({len(train_tokens):,} train / {len(val_tokens):,} val), "
        f"{tokenizer.kind} tokenizer with {tokenizer.vocab_size} ids"
        + (f", {corpus.replaced_bytes} undecodable bytes replaced" if corpus.replaced_bytes else "")
    )
    return RunData(tokenizer, train_iter, eval_batches, description)


def _prepared_data(cfg: Config, run_dir: Path, paths: list[str]) -> RunData:
    metas = [load_dataset_metadata(p) for p in paths]
    if cfg.data.weights and len(cfg.data.weights) != len(paths):
        raise ConfigError(f"data.weights: {len(cfg.data.weights)} weights for {len(paths)} datasets in data.path")
    # A prepared dataset carries the tokenizer its ids were made with.
    tokenizer = _saved_or_configured_tokenizer(cfg, run_dir) or load_tokenizer(Path(paths[0]) / "tokenizer")
    rows = _split_rows(cfg)
    train_iter = make_packed_train_iterator(
        paths, cfg.data.weights or None, seed=cfg.seed, tokenizer_fingerprint=tokenizer.fingerprint(), **rows
    )
    eval_batches = make_packed_eval_batches(paths, num_batches=cfg.train.eval_steps, **rows)
    tokens = sum(m["tokens"] for m in metas)
    documents = sum(m["documents"] for m in metas)
    description = (
        f"{len(paths)} prepared dataset(s), {documents:,} documents, {tokens:,} tokens, packed into rows "
        f"of {cfg.model.seq_len}; {tokenizer.kind} tokenizer with {tokenizer.vocab_size} ids"
    )
    return RunData(tokenizer, train_iter, eval_batches, description)


def truncate_documents(documents: list[str], max_chars: int) -> list[str]:
    """The first `max_chars` characters of the corpus (data.max_bytes)."""
    out, total = [], 0
    for doc in documents:
        if total >= max_chars:
            break
        out.append(doc[: max_chars - total])
        total += len(out[-1])
    return out
