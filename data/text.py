"""Plain-text corpora: resolve `data.path` specs to files and read them as documents."""

from __future__ import annotations

import glob
import os
import re
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# `data.path: stdlib` means the built-in corpus: this Python's own standard library source,
# present wherever Python is, so a fresh clone can train without downloading anything.
# (A directory that happens to be named "stdlib" is reached as "./stdlib".)
DEFAULT_CORPUS = "stdlib"

# Left out of the default corpus: tests, installed packages, and large generated or
# repetitive code (codec tables, pydoc's topic strings) that would crowd out real modules.
_EXCLUDED_STDLIB_DIRS = {
    "test",
    "tests",
    "site-packages",
    "dist-packages",
    "idlelib",
    "lib2to3",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
_GLOB_CHARS = re.compile(r"[*?\[]")
# surrogateescape turns each undecodable byte into one lone surrogate U+DC80..U+DCFF.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


@dataclass
class Corpus:
    """Documents read from files: one document per non-empty file, in `paths` order."""

    documents: list[str]
    paths: list[Path]
    replaced_bytes: int  # undecodable bytes replaced by U+FFFD
    total_bytes: int  # bytes read from disk (before CRLF normalization)


def default_corpus_paths(max_bytes: int = 4_000_000) -> list[Path]:
    """The standard library's `.py` files, sorted by relative path, up to `max_bytes` total.

    Files are taken in sorted order until the next would pass `max_bytes`.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place: site-packages alone can be far larger than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    paths, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        paths.append(p)
        total += size
    if not paths:
        raise FileNotFoundError(f"data.path: the default corpus {DEFAULT_CORPUS!r} found no .py files under {root}")
    return paths


def _flaxpod_output(directory: Path) -> str | None:
    """What flaxpod wrote `directory` as, if it did: its checkpoints, metrics and token shards are
    not text, and a run directory inside the data would be read back as training text on resume."""
    if (directory / "config.yaml").is_file() and any(
        (directory / name).exists() for name in ("checkpoints", "metrics.jsonl", "tokenizer")
    ):
        return "a flaxpod run directory"
    if (directory / "metadata.json").is_file() and (directory / "tokenizer").is_dir():
        return "a prepared dataset"
    return None


def _walk_text_dir(root: Path, what: str) -> list[Path]:
    """Every file below root, sorted, leaving out hidden names and any flaxpod run directory or
    prepared dataset met on the way (said on stderr)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            found = None if name.startswith(".") else _flaxpod_output(here / name)
            if found:
                print(f"note: {what}: skipping {here / name}: {found}, not text", file=sys.stderr, flush=True)
            elif not name.startswith("."):
                kept.append(name)
        dirnames[:] = kept
        files += [here / f for f in filenames if not f.startswith(".")]
    return sorted(files)


def _resolve_one(spec: str, what: str) -> list[Path]:
    if spec == DEFAULT_CORPUS:
        return default_corpus_paths()
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return _walk_text_dir(path, what)
    if _GLOB_CHARS.search(spec):
        # glob skips hidden names unless the pattern spells the dot out.
        matches = glob.glob(os.path.expanduser(spec), recursive=True)
        return sorted(Path(p) for p in matches if Path(p).is_file())
    return []


def resolve_text_paths(spec: str | Sequence[str], what: str = "data.path") -> list[Path]:
    """Files named by one spec or several: a file, a directory (recursive), or a glob.

    Each spec's files are sorted; specs keep their order and duplicates are dropped.
    `DEFAULT_CORPUS` ("stdlib") stands for `default_corpus_paths()`. `what` names the option
    in messages (`data.path`, `--text`, `input`).
    """
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not specs:
        raise ValueError(f"{what}: no path given")
    out: dict[Path, None] = {}
    for s in specs:
        found = _resolve_one(os.fspath(s), what)
        if not found:
            raise FileNotFoundError(f"{what}: no files match {os.fspath(s)!r}")
        out.update(dict.fromkeys(found))
    return list(out)


def _decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text of `data` with each undecodable byte replaced by U+FFFD, and their count.

    U+FFFD characters already present in the file are not counted.
    """
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        escaped = data.decode("utf-8", errors="surrogateescape")
        text, replaced = _ESCAPED_BYTE.subn("\ufffd", escaped)
        return text, replaced


def read_corpus(paths: Sequence[str | Path], what: str = "data.path") -> Corpus:
    """Read files as UTF-8 documents (bad bytes replaced, CRLF -> LF, empty files skipped)."""
    paths = [Path(p) for p in paths]
    documents, kept, replaced, total = [], [], 0, 0
    for path in paths:
        data = path.read_bytes()
        total += len(data)
        if not data:
            continue
        text, bad = _decode(data)
        documents.append(text.replace("\r\n", "\n"))
        kept.append(path)
        replaced += bad
    if not documents:
        where = os.path.commonpath([p.absolute() for p in paths]) if paths else ""
        raise ValueError(f"{what}: corpus '{where}' is empty ({len(paths)} files, 0 bytes)")
    return Corpus(documents=documents, paths=kept, replaced_bytes=replaced, total_bytes=total)
