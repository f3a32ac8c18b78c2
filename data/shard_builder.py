"""Cut each split's documents into shards, tokenize them in worker processes, write them.

Shards are cut by document count or by input text bytes, both known before tokenizing, so
a shard's content is fixed by its documents and the tokenizer. Their plan hash (sha256
over the tokenizer's hash and the documents' hashes) is saved beside each finished shard
in `STATE_DIR`; a later run skips every shard whose plan hash and file sha256 still match
and redoes the rest.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flaxpod.data.documents import Document
from flaxpod.data.progress import Progress
from flaxpod.data.shards import ShardWriter, encode_record, file_sha256, read_json, shard_name, write_json
from flaxpod.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "val")
STATE_DIR = ".prepare-state"
# Bump when the record layout changes, so that older shards are never reused.
RECORD_LAYOUT_VERSION = 1
# One tokenization task holds up to this much text, so workers stay busy to a shard's end.
TASK_TEXT_CHARS = 1 << 20
TASK_MAX_DOCUMENTS = 512

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _tokenize_task(task: tuple[list[str], list[str]]) -> list[bytes]:
    return encode_documents(_worker_tokenizer, *task)


def encode_documents(tokenizer: Tokenizer, texts: list[str], sources: list[str]) -> list[bytes]:
    """Records (see `data.shards.encode_record`) of documents: the tokenizer's BOS policy
    applied (`prefix_ids`), eos appended if it exists.

    A document the tokenizer rejects is named by its source in the error.
    """
    try:
        ids = tokenizer.encode_batch(texts)
    except ValueError:
        for text, source in zip(texts, sources, strict=True):
            try:
                tokenizer.encode(text)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        raise
    prefix = tokenizer.prefix_ids
    return [encode_record(prefix + doc, tokenizer.eos_id) for doc in ids]


def _tasks(texts: Sequence[str], sources: Sequence[str]) -> Iterator[tuple[list[str], list[str]]]:
    start, size = 0, 0
    for i, text in enumerate(texts):
        if i > start and (size + len(text) > TASK_TEXT_CHARS or i - start >= TASK_MAX_DOCUMENTS):
            yield list(texts[start:i]), list(sources[start:i])
            start, size = i, 0
        size += len(text)
    if start < len(texts):
        yield list(texts[start:]), list(sources[start:])


class TokenizerPool:
    """Tokenizes documents in order, in this process (workers=1) or in worker processes."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_dir: Path, workers: int) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.workers = workers
        self._pool = None

    def records(self, texts: Sequence[str], sources: Sequence[str]) -> Iterator[bytes]:
        """The record of each document, in order."""
        tasks = _tasks(texts, sources)
        if self.workers <= 1:
            results = (encode_documents(self.tokenizer, *task) for task in tasks)
        else:
            if self._pool is None:
                # spawn, not fork: the caller may have started JAX or other threads.
                context = multiprocessing.get_context("spawn")
                self._pool = context.Pool(self.workers, initializer=_init_worker, initargs=(str(self.tokenizer_dir),))
            results = self._pool.imap(_tokenize_task, tasks)
        for records in results:
            yield from records

    def close(self) -> None:
        """Stops the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


@dataclass
class _PendingShard:
    """Documents assigned to the next shard of one split, not yet written."""

    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    disk_offsets: list[int] = field(default_factory=list)  # input position after each
    text_bytes: int = 0

    def add(self, doc: Document, digest: bytes, size: int) -> None:
        self.texts.append(doc.text)
        self.sources.append(doc.source)
        self.hashes.append(digest)
        self.text_bytes += size
        self.disk_offsets.append(doc.disk_offset)


def plan_hash(tokenizer_fingerprint: str, document_hashes: Iterable[bytes]) -> str:
    """Identity of a shard's content: layout version, tokenizer and documents, in order."""
    digest = hashlib.sha256(f"{RECORD_LAYOUT_VERSION}:{tokenizer_fingerprint}:".encode())
    for h in document_hashes:
        digest.update(h)
    return digest.hexdigest()


class ShardBuilder:
    """Receives documents by split, cuts them into shards and writes or reuses each shard."""

    def __init__(
        self,
        out: Path,
        tokenizers: TokenizerPool,
        progress: Progress,
        *,
        shard_docs: int | None,
        shard_bytes: int | None,
    ) -> None:
        self.out = out
        self.tokenizers = tokenizers
        self.fingerprint = tokenizers.tokenizer.fingerprint()
        self.progress = progress
        self.shard_docs = shard_docs
        self.shard_bytes = shard_bytes
        self.pending = {split: _PendingShard() for split in SPLITS}
        self.shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
        self.reused = 0
        self.oversized_documents = 0
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)

    def add(self, split: str, doc: Document, digest: bytes) -> None:
        """Assigns `doc` to the split's current shard; writes the shard once it is full."""
        size = len(doc.text.encode("utf-8"))
        pending = self.pending[split]
        if self.shard_bytes is not None:
            if size > self.shard_bytes:
                self.oversized_documents += 1
            # A document that would overflow the current shard starts the next one, so only
            # a document bigger than a whole shard makes a shard exceed shard_bytes.
            if pending.texts and pending.text_bytes + size > self.shard_bytes:
                self._flush(split)
                pending = self.pending[split]
        pending.add(doc, digest, size)
        full_by_docs = self.shard_docs is not None and len(pending.texts) >= self.shard_docs
        full_by_bytes = self.shard_bytes is not None and pending.text_bytes >= self.shard_bytes
        if full_by_docs or full_by_bytes:
            self._flush(split)

    def finish(self) -> dict[str, list[dict]]:
        """Writes each split's last shard, deletes files of older runs; returns the shards."""
        for split in SPLITS:
            self._flush(split)
        for split in SPLITS:
            keep = {Path(entry["path"]).name for entry in self.shards[split]}
            for path in (self.out / split).iterdir():
                if path.name not in keep and re.fullmatch(r"shard-\d+\.array_record(\.tmp)?", path.name):
                    path.unlink()
            for path in (self.out / STATE_DIR).glob(f"{split}-*.json"):
                if int(path.stem.rsplit("-", 1)[1]) >= len(self.shards[split]):
                    path.unlink()
        return self.shards

    def _flush(self, split: str) -> None:
        pending = self.pending[split]
        if not pending.texts:
            return
        self.pending[split] = _PendingShard()
        index = len(self.shards[split])
        rel = f"{split}/{shard_name(index)}"
        state_path = self.out / STATE_DIR / f"{split}-{index:05d}.json"
        plan = plan_hash(self.fingerprint, pending.hashes)
        entry = self._reusable(self.out / rel, state_path, plan)
        if entry is not None:
            self.reused += 1
            self.progress.update(len(pending.texts), pending.disk_offsets[-1])
        else:
            entry = self._write(rel, pending)
            write_json(state_path, {"plan": plan, **entry})
        self.shards[split].append(entry)

    @staticmethod
    def _reusable(path: Path, state_path: Path, plan: str) -> dict | None:
        state = read_json(state_path)
        if not state or state.get("plan") != plan or not path.is_file():
            return None
        if path.stat().st_size != state.get("bytes") or file_sha256(path) != state.get("sha256"):
            return None
        return {k: state[k] for k in ("path", "documents", "tokens", "bytes", "sha256")}

    def _write(self, rel: str, pending: _PendingShard) -> dict:
        path = self.out / rel
        with ShardWriter(path) as writer:
            records = self.tokenizers.records(pending.texts, pending.sources)
            for record, disk_offset in zip(records, pending.disk_offsets, strict=True):
                writer.write(record)
                self.progress.update(1, disk_offset)
            writer.commit()
        return {
            "path": rel,
            "documents": writer.documents,
            "tokens": writer.tokens,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
