"""ArrayRecord shards of token ids: one record per document, written atomically.

A record is the document's token ids followed by the tokenizer's eos id, as little-endian
int32 bytes. A shard is first written under a temporary name and renamed only once it is
complete and flushed to disk, so a file with a final shard name is always whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

RECORD_DTYPE = np.dtype("<i4")
# group_size:1 makes every record its own chunk: Grain's ArrayRecordDataSource refuses
# anything else because random access would have to decompress whole groups.
WRITER_OPTIONS = "group_size:1,zstd:3"
TMP_SUFFIX = ".tmp"
# The `format` of a prepared dataset's meta.json: written by data/prepare.py, checked by data/prepared.py.
FORMAT = "flaxpod-prepared-dataset"


def shard_name(index: int) -> str:
    """File name of the shard with this index inside a split directory."""
    return f"shard-{index:05d}.array_record"


def encode_record(ids: Sequence[int] | np.ndarray, eos_id: int | None) -> bytes:
    """Bytes of one document record: its token ids, then `eos_id` if not None, as int32 LE."""
    out = np.empty(len(ids) + (eos_id is not None), dtype=RECORD_DTYPE)
    out[: len(ids)] = ids
    if eos_id is not None:
        out[-1] = eos_id
    return out.tobytes()


def decode_record(record: bytes) -> np.ndarray:
    """Token ids (int32) of one record; the last one is the eos id."""
    return np.frombuffer(record, dtype=RECORD_DTYPE).astype(np.int32, copy=False)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None if it is missing or unreadable."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Writes `obj` as indented JSON through a temporary file, so readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes records to `<path>.tmp`; `commit()` flushes and renames it to `path`.

    Leaving the writer without `commit()` (an exception) deletes the temporary file; a
    killed process leaves it behind under its temporary name, never under the final one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + TMP_SUFFIX)
        self.tmp_path.unlink(missing_ok=True)
        self._writer = ArrayRecordWriter(str(self.tmp_path), WRITER_OPTIONS)
        self.documents = 0
        self.tokens = 0

    def write(self, record: bytes) -> None:
        """Appends one record (see `encode_record`)."""
        self._writer.write(record)
        self.documents += 1
        self.tokens += len(record) // RECORD_DTYPE.itemsize

    def commit(self) -> None:
        """Closes the file, flushes it to disk and gives it its final name."""
        if not self._writer.ok():
            raise OSError(f"writing {self.tmp_path} failed")
        self._writer.close()
        _fsync_path(self.tmp_path)
        os.replace(self.tmp_path, self.path)
        _fsync_path(self.path.parent)

    def abort(self) -> None:
        """Closes and deletes the temporary file."""
        if self._writer.is_open():
            self._writer.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
