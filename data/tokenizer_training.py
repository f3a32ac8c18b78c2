"""Which tokenizer a job uses: one it saved before, a given one, or one trained here (SentencePiece,
or a byte-level BPE with `tokenizers`).

Shared by `flaxpod tokenizer` (train only), `flaxpod prepare` (train, or reuse the one a previous
run of the same command trained, so that re-running rewrites nothing) and training runs (the run's
saved tokenizer, else `tokenizer.path`, else one trained in memory on the run's text).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flaxpod.data.documents import DocumentReader, RowFilter, document_hash, hash_below
from flaxpod.data.hf_tokenizers import train_byte_level_bpe
from flaxpod.data.shards import read_json, write_json
from flaxpod.data.tokenizer import (
    Tokenizer,
    has_tokenizer,
    load_tokenizer,
    train_sentencepiece,
    train_tokenizer_of_kind,
)

DEFAULT_SAMPLE_BYTES = 256 << 20
# Salt for the sample choice, so it is independent of the validation split's choice.
_SAMPLE_SALT = b"tokenizer-sample:"


def load_tokenizer_arg(spec: str | os.PathLike, option: str = "--tokenizer") -> Tokenizer:
    """The tokenizer named by `option` (--tokenizer, tokenizer.path): a flaxpod or Hugging Face tokenizer
    directory, a tokenizer.json, or a SentencePiece `.model` file."""
    path = Path(spec)
    if path.exists():
        return load_tokenizer(path)
    raise FileNotFoundError(f"{option} {os.fspath(spec)!r}: no such directory or tokenizer file")


def saved_or_given_tokenizer(saved: Path, given: str | os.PathLike | None, option: str) -> Tokenizer | None:
    """The tokenizer saved in `saved` (a resumed job keeps the one it started with), else the `given`
    tokenizer (named by `option` in errors); None when there is neither and one must be trained."""
    if has_tokenizer(saved):
        return load_tokenizer(saved)
    if given:
        return load_tokenizer_arg(given, option)
    return None


def train_tokenizer_on_texts(
    kind: str, texts: list[str], *, vocab_size: int, model_type: str, special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """A `char`, `sentencepiece` or `huggingface` (byte-level BPE) tokenizer trained in memory on `texts`
    (a training run's corpus), with `special_tokens` (sentencepiece only) as user-defined symbols."""
    return train_tokenizer_of_kind(kind, texts, vocab_size, model_type, special_tokens)


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Saves `tokenizer` as the only tokenizer file in `directory`."""
    if directory.is_dir():
        # A file of another tokenizer kind left behind would make load_tokenizer ambiguous.
        for stale in directory.iterdir():
            if stale.is_file():
                stale.unlink()
    tokenizer.save(directory)


def _sample_texts(reader: DocumentReader, sample_bytes: int, counts: dict) -> Iterator[str]:
    """Documents kept with probability sample_bytes / input size (by hash), up to the cap.

    Choosing by hash rather than taking the first N bytes spreads the sample over all
    inputs and keeps it identical from run to run.
    """
    keep = min(1.0, sample_bytes / max(reader.total_disk_bytes(), 1))
    for doc in reader:
        if counts["chars"] >= sample_bytes:
            break
        if hash_below(document_hash(doc.text, _SAMPLE_SALT), keep):
            counts["documents"] += 1
            counts["chars"] += len(doc.text)
            yield doc.text


def train_tokenizer_on_inputs(
    files: Sequence[Path],
    *,
    vocab_size: int,
    model_type: str,
    jsonl_field: str = "text",
    row_filter: RowFilter | None = None,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    byte_fallback: bool = True,
) -> tuple[Tokenizer, dict]:
    """Trains a tokenizer on a hash-chosen sample of the documents in `files`: SentencePiece
    (model_type bpe or unigram) or a byte-level BPE with `tokenizers` (model_type byte-bpe).

    Returns the tokenizer and how it was trained (settings, sample size) for metadata.
    """
    counts = {"documents": 0, "chars": 0}
    texts = _sample_texts(DocumentReader(files, jsonl_field=jsonl_field, row_filter=row_filter), sample_bytes, counts)
    if model_type == "byte-bpe":
        tokenizer = train_byte_level_bpe(texts, vocab_size)
    else:
        tokenizer = train_sentencepiece(texts, vocab_size, model_type=model_type, byte_fallback=byte_fallback)
    if counts["documents"] == 0:
        raise ValueError("tokenizer: the inputs hold no text to train on")
    info = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "byte_fallback": byte_fallback,
        "sample_documents": counts["documents"],
        "sample_chars": counts["chars"],
    }
    return tokenizer, info


def _request_hash(files: Sequence[Path], request: dict) -> str:
    """Identity of a training request: its settings and its inputs' names, sizes, mtimes."""
    described = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([request, described]).encode()).hexdigest()


def dataset_tokenizer(
    tokenizer: str | os.PathLike | Tokenizer | None,
    files: Sequence[Path],
    directory: Path,
    record_path: Path,
    *,
    vocab_size: int,
    model_type: str,
    jsonl_field: str,
    sample_bytes: int,
    log: Callable[[str], None],
    row_filter: RowFilter | None = None,
) -> tuple[Tokenizer, dict]:
    """The tokenizer of a dataset being prepared, saved in `directory`.

    A given `tokenizer` (directory, `.model` file or object) is copied there. Otherwise one
    is trained on `files`, unless `record_path` shows that the tokenizer already in
    `directory` was trained by the same request on unchanged inputs.
    """
    if tokenizer is not None:
        given = isinstance(tokenizer, Tokenizer)
        tok = tokenizer if given else load_tokenizer_arg(tokenizer)
        save_tokenizer(tok, directory)
        return tok, {"source": None if given else os.fspath(tokenizer)}

    request = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "jsonl_field": jsonl_field,
        "row_filter": (row_filter or RowFilter()).as_dict(),
        "sample_bytes": sample_bytes,
    }
    request_hash = _request_hash(files, request)
    previous = read_json(record_path)
    if previous and previous.get("request") == request_hash and has_tokenizer(directory):
        tok = load_tokenizer(directory)
        if tok.fingerprint() == previous.get("fingerprint"):
            log(f"reusing the tokenizer a previous run trained ({directory})")
            return tok, previous["info"]
    log(f"training a {model_type} tokenizer, vocab {vocab_size} ...")
    tok, info = train_tokenizer_on_inputs(
        files,
        vocab_size=vocab_size,
        model_type=model_type,
        jsonl_field=jsonl_field,
        row_filter=row_filter,
        sample_bytes=sample_bytes,
    )
    save_tokenizer(tok, directory)
    write_json(record_path, {"request": request_hash, "fingerprint": tok.fingerprint(), "info": info})
    return tok, info
