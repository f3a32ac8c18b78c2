"""Documents from raw inputs: text files (one file, one document), `.gz` files and JSONL.

A text file is one document; a JSONL file holds one document per non-blank line, in the
string field the caller names. `.gz` files are read through gzip. Bytes are decoded as
UTF-8 with the rule of `data.text` (each invalid byte becomes U+FFFD and is counted; CRLF
becomes LF), so prepared shards and tokenizers see exactly what the rest of flaxpod sees.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from flaxpod.data.text import _decode, resolve_text_paths


def decode_text(data: bytes) -> tuple[str, int]:
    """(text, undecodable bytes replaced by U+FFFD) of UTF-8 `data`, CRLF turned into LF."""
    # data.text keeps its byte rule private to read_corpus; sharing it (rather than a
    # second copy) keeps prepared shards and nanoGPT-style runs decoding alike.
    text, replaced = _decode(data)
    return text.replace("\r\n", "\n"), replaced


def document_hash(text: str, salt: bytes = b"") -> bytes:
    """sha256 of `salt` + the document's UTF-8 text: its identity for splits and samples."""
    return hashlib.sha256(salt + text.encode("utf-8")).digest()


def hash_below(digest: bytes, fraction: float) -> bool:
    """Whether the digest's first 8 bytes, as a fraction of 2**64, are below `fraction`.

    Choosing documents this way depends on each document alone: adding inputs never
    changes the choice for the documents already there.
    """
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


@dataclass(frozen=True)
class Document:
    """One document and where it came from."""

    text: str
    source: str  # "path" for a text file, "path:LINE" for a JSONL row
    disk_offset: int  # input bytes on disk consumed up to the end of this document (ETA)


MAX_EXAMPLES = 10


@dataclass
class ReadStats:
    """What reading the inputs found; reported by `flaxpod prepare` and kept in metadata."""

    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    text_bytes: int = 0
    replaced_bytes: int = 0
    files_with_replacements: int = 0
    # The first MAX_EXAMPLES of them, to report without growing with the input.
    replacement_examples: list[str] = field(default_factory=list)
    crlf_documents: int = 0
    longest_line_chars: int = 0

    def as_dict(self) -> dict:
        """JSON-ready copy."""
        return {
            "files": self.files,
            "documents": self.documents,
            "empty_documents": self.empty_documents,
            "text_bytes": self.text_bytes,
            "replaced_bytes": self.replaced_bytes,
            "files_with_replacements": self.files_with_replacements,
            "replacement_examples": list(self.replacement_examples),
            "crlf_documents": self.crlf_documents,
            "longest_line_chars": self.longest_line_chars,
        }


def input_files(specs: Sequence[str]) -> list[Path]:
    """Files named by `specs` (files, directories, globs), in order, each listed once.

    Raises FileNotFoundError naming the first spec that matches nothing.
    """
    if not specs:
        raise ValueError("no inputs given: name at least one file, directory or glob")
    seen: set[Path] = set()
    files: list[Path] = []
    for spec in specs:
        for path in resolve_text_paths(spec, what="input"):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def is_jsonl(path: Path) -> bool:
    """Whether `path` is read as JSONL (one document per line) rather than as one text."""
    name = path.name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def _open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(stream to read, raw file whose position measures progress)."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise ValueError(f"cannot read input {path}: {e.strerror or e}") from e
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def _longest_line(text: str) -> int:
    return max(map(len, text.split("\n")), default=0)


class DocumentReader:
    """Iterates the documents of a list of files and keeps `ReadStats` as it goes."""

    def __init__(self, files: Sequence[Path], *, jsonl_field: str = "text") -> None:
        self.files = list(files)
        self.jsonl_field = jsonl_field
        self.stats = ReadStats()
        self._last_replaced_file: Path | None = None

    def total_disk_bytes(self) -> int:
        """Sum of the input files' sizes on disk (the denominator of the ETA)."""
        return sum(p.stat().st_size for p in self.files)

    def __iter__(self) -> Iterator[Document]:
        finished_files_bytes = 0
        for path in self.files:
            self.stats.files += 1
            stream, raw = _open_binary(path)
            try:
                with raw, stream:
                    read = self._jsonl_documents if is_jsonl(path) else self._text_document
                    for text, source in read(path, stream):
                        yield Document(text, source, finished_files_bytes + raw.tell())
                    finished_files_bytes += raw.tell()
            except (OSError, EOFError, zlib.error) as e:
                # gzip.BadGzipFile is an OSError; a truncated .gz ends in EOFError.
                raise ValueError(f"cannot read input {path}: {e}") from e

    def _count(self, text: str, raw_bytes: bytes, replaced: int, path: Path) -> None:
        self.stats.replaced_bytes += replaced
        if replaced and path != self._last_replaced_file:
            self._last_replaced_file = path
            self.stats.files_with_replacements += 1
            if len(self.stats.replacement_examples) < MAX_EXAMPLES:
                self.stats.replacement_examples.append(str(path))
        if b"\r\n" in raw_bytes:
            self.stats.crlf_documents += 1
        if not text:
            self.stats.empty_documents += 1
            return
        self.stats.documents += 1
        self.stats.text_bytes += len(text.encode("utf-8"))
        self.stats.longest_line_chars = max(self.stats.longest_line_chars, _longest_line(text))

    def _text_document(self, path: Path, stream: BinaryIO) -> Iterator[tuple[str, str]]:
        data = stream.read()
        text, replaced = decode_text(data)
        self._count(text, data, replaced, path)
        if text:
            yield text, str(path)

    def _jsonl_documents(self, path: Path, stream: BinaryIO) -> Iterator[tuple[str, str]]:
        for line_number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            line_text, replaced = decode_text(line)
            try:
                row = json.loads(line_text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            if self.jsonl_field not in row:
                keys = ", ".join(sorted(row)) or "none"
                raise ValueError(
                    f"{path}:{line_number}: no field {self.jsonl_field!r} (keys: {keys}); choose it with --jsonl-field"
                )
            value = row[self.jsonl_field]
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}:{line_number}: field {self.jsonl_field!r} must be a string, got {type(value).__name__}"
                )
            text = value.replace("\r\n", "\n")
            self._count(text, b"\r\n" if "\r\n" in value else b"", replaced, path)
            if text:
                yield text, f"{path}:{line_number}"
