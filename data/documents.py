"""Documents from raw inputs: text files (one file, one document), JSONL and Parquet.

A text file is one document; a JSONL file holds one document per non-blank line, and a Parquet
file one per row, in the string field the caller names (a dotted path such as `meta.text` for
nested objects or structs). `.gz` and `.zst` files are read through gzip and zstandard; Parquet
is read one row group at a time (pyarrow), so memory stays bounded by the largest row group.
Rows can be skipped with a `RowFilter` (a minimum for a numeric field, a required value for
another). Bytes are decoded as
UTF-8 with the rule of `data.text` (each invalid byte becomes U+FFFD and is counted; CRLF
becomes LF), so prepared shards and tokenizers see exactly what the rest of flaxpod sees.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
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
PARQUET_BATCH_ROWS = 1024


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
    filtered_rows: int = 0  # JSONL/Parquet rows the row filter skipped

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
            "filtered_rows": self.filtered_rows,
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


_COMPRESSED = (".gz", ".zst")


def _uncompressed_name(path: Path) -> str:
    name = path.name.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_jsonl(path: Path) -> bool:
    """Whether `path` is read as JSONL (one document per line) rather than as one text."""
    return _uncompressed_name(path).endswith((".jsonl", ".ndjson"))


def is_parquet(path: Path) -> bool:
    """Whether `path` is a Parquet file (one document per row)."""
    return path.name.lower().endswith(".parquet")


def _open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(stream to read, raw file whose position measures progress)."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise ValueError(f"cannot read input {path}: {e.strerror or e}") from e
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if name.endswith(".zst"):
        # read_across_frames: files made by concatenating zstd streams (as `zstd` and many
        # dataset tools write them) are read whole, not just their first frame.
        return io.BufferedReader(_ZstdFrames(raw, path), buffer_size=1 << 20), raw
    return raw, raw


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a file of one or more concatenated zstd frames.

    zstandard's stream_reader returns a short stream, silently, when the file ends inside a
    frame; decompressing frame by frame with decompressobj lets a truncated file be an error.
    """

    def __init__(self, raw: BinaryIO, path: Path):
        import zstandard

        self._raw, self._path, self._zstd = raw, path, zstandard
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._obj.unused_data if self._obj.eof else b""
            if self._obj.eof:
                self._obj = self._zstd.ZstdDecompressor().decompressobj()
                self._in_frame = False
            chunk = chunk or self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise ValueError(f"cannot read input {self._path}: truncated zstd stream (it ends inside a frame)")
                return 0
            self._in_frame = True
            try:
                self._pending = self._obj.decompress(chunk)
            except self._zstd.ZstdError as e:
                raise ValueError(f"cannot read input {self._path}: corrupt zstd stream ({e})") from None
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def field_path(name: str) -> tuple[str, ...]:
    """'meta.text' -> ('meta', 'text'): a field of a JSON object or Parquet struct, nested by dots."""
    parts = tuple(name.split("."))
    if not all(parts):
        raise ValueError(f"field {name!r}: expected names separated by single dots, e.g. text or meta.text")
    return parts


def _lookup(row: object, path: tuple[str, ...]) -> tuple[bool, object]:
    for part in path:
        if not isinstance(row, dict) or part not in row:
            return False, None
        row = row[part]
    return True, row


@dataclass(frozen=True)
class RowFilter:
    """Which JSONL/Parquet rows to keep: every `min_values` field a number >= its minimum, every
    `require_values` field equal to its string. A row missing a filter field is skipped (it
    cannot satisfy it); a filter field of the wrong type is an error naming the row."""

    min_values: tuple[tuple[str, float], ...] = ()
    require_values: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def parse(min_fields: Sequence[str] = (), require_fields: Sequence[str] = ()) -> RowFilter:
        """From --min-field NAME=NUMBER and --require-field NAME=VALUE arguments."""

        def split(arg: str, flag: str) -> tuple[str, str]:
            name, sep, value = arg.partition("=")
            if not sep or not name:
                raise ValueError(f"{flag} {arg!r}: expected NAME=VALUE")
            field_path(name)
            return name, value

        mins = []
        for arg in min_fields:
            name, value = split(arg, "--min-field")
            try:
                mins.append((name, float(value)))
            except ValueError:
                raise ValueError(f"--min-field {arg!r}: {value!r} is not a number") from None
        return RowFilter(tuple(mins), tuple(split(a, "--require-field") for a in require_fields))

    def __bool__(self) -> bool:
        return bool(self.min_values or self.require_values)

    def keeps(self, row: dict, where: str) -> bool:
        """Whether `row` passes; `where` (file:row) names it in errors."""
        for name, minimum in self.min_values:
            found, value = _lookup(row, field_path(name))
            if not found or value is None:
                return False
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}: filter field {name!r} must be a number, got {type(value).__name__}")
            if math.isnan(value) or value < minimum:
                return False
        for name, wanted in self.require_values:
            found, value = _lookup(row, field_path(name))
            if not found or value != wanted:
                return False
        return True

    def as_dict(self) -> dict:
        """JSON-ready copy (for metadata)."""
        return {"min": dict(self.min_values), "require": dict(self.require_values)}


def _longest_line(text: str) -> int:
    return max(map(len, text.split("\n")), default=0)


class DocumentReader:
    """Iterates the documents of a list of files and keeps `ReadStats` as it goes."""

    def __init__(
        self, files: Sequence[Path], *, jsonl_field: str = "text", row_filter: RowFilter | None = None
    ) -> None:
        self.files = list(files)
        self.jsonl_field = jsonl_field
        self.field = field_path(jsonl_field)
        self.row_filter = row_filter or RowFilter()
        self.stats = ReadStats()
        self._last_replaced_file: Path | None = None

    def total_disk_bytes(self) -> int:
        """Sum of the input files' sizes on disk (the denominator of the ETA)."""
        return sum(p.stat().st_size for p in self.files)

    def __iter__(self) -> Iterator[Document]:
        finished_files_bytes = 0
        for path in self.files:
            self.stats.files += 1
            if is_parquet(path):
                for text, source, offset in self._parquet_documents(path):
                    yield Document(text, source, finished_files_bytes + offset)
                finished_files_bytes += path.stat().st_size
                continue
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

    def _row_text(self, row: object, where: str) -> str | None:
        """The text field of a JSON object or Parquet row; None if the filter skips the row."""
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        found, value = _lookup(row, self.field)
        if not found:
            keys = ", ".join(sorted(row)) or "none"
            raise ValueError(
                f"{where}: no field {self.jsonl_field!r} (keys: {keys}); choose it with --text-field/--jsonl-field"
            )
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: field {self.jsonl_field!r} must be a string, got {type(value).__name__}")
        if self.row_filter and not self.row_filter.keeps(row, where):
            self.stats.filtered_rows += 1
            return None
        return value or ""

    def _jsonl_documents(self, path: Path, stream: BinaryIO) -> Iterator[tuple[str, str]]:
        for line_number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            line_text, replaced = decode_text(line)
            try:
                row = json.loads(line_text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg})") from None
            value = self._row_text(row, f"{path}:{line_number}")
            if value is None:
                continue
            text = value.replace("\r\n", "\n")
            self._count(text, b"\r\n" if "\r\n" in value else b"", replaced, path)
            if text:
                yield text, f"{path}:{line_number}"

    def _parquet_documents(self, path: Path) -> Iterator[tuple[str, str, int]]:
        """(text, "path:row ROW", bytes of the file done) per row, a batch of rows in memory at a time."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            # pre_buffer (on by default) caches whole column chunks, and its memory grows with the
            # file: measured 126 -> 149 MiB peak RSS from a 24 to a 72 MB file, flat 108 -> 112 without.
            parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"cannot read input {path}: not a readable Parquet file ({e})") from e
        top = self.field[0]
        names = parquet.schema_arrow.names
        if top not in names:
            raise ValueError(f"{path}: no column {top!r} (columns: {', '.join(names)}); choose it with --text-field")
        wanted = [top, *{f[0] for f in self._filter_fields()} - {top}]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} for the row filter (columns: {', '.join(names)})")
        rows_total, row, size = parquet.metadata.num_rows, 0, path.stat().st_size
        with parquet:
            # Batches of rows rather than whole row groups: a row group can be hundreds of MB.
            batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted, use_threads=False)
            while True:
                try:
                    batch = next(batches, None)
                except (OSError, pa.ArrowException) as e:
                    raise ValueError(f"cannot read input {path}: after row {row}: {e}") from e
                if batch is None:
                    break
                done = int(size * (row + batch.num_rows) / max(rows_total, 1))
                for value_row in batch.to_pylist():
                    where = f"{path}:row {row}"
                    row += 1
                    value = self._row_text(value_row, where)
                    if value is None:
                        continue
                    text = value.replace("\r\n", "\n")
                    self._count(text, b"\r\n" if "\r\n" in value else b"", 0, path)
                    if text:
                        yield text, where, done
                del batch
                # Arrow's allocator keeps freed buffers; hand them back so RSS stays flat.
                pa.default_memory_pool().release_unused()

    def _filter_fields(self) -> list[tuple[str, ...]]:
        return [field_path(n) for n, _ in (*self.row_filter.min_values, *self.row_filter.require_values)]
