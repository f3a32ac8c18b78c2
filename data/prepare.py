"""`flaxpod prepare`: tokenize raw text once into ArrayRecord shards that every host can read.

    flaxpod prepare INPUTS... --out DIR [--tokenizer DIR_OR_FILE | --vocab-size 8000
        --model-type bpe] [--text-field text] [--min-field score=0.5] [--require-field lang=en]
        [--val-fraction 0.005] [--shard-docs N | --shard-bytes 64M] [--workers N]
    flaxpod tokenizer INPUTS... --out DIR --vocab-size 8000 --model-type bpe|unigram|byte-bpe

INPUTS are text files, JSONL (one document per line), Parquet (one per row, read a row group at
a time), each optionally .gz or .zst compressed (not Parquet), as files, directories or globs
over mixed formats. --text-field names the string field (dotted for nested: meta.text);
--min-field and --require-field skip rows (repeatable; all must hold); empty texts are skipped.

Output directory:

    DIR/metadata.json         counts, shard list (sizes, sha256), tokenizer hash, command
    DIR/tokenizer/            the tokenizer the shards were made with
    DIR/train/shard-00000.array_record ...
    DIR/val/shard-00000.array_record ...
    DIR/.prepare-state/       one small JSON per finished shard, so a re-run can skip it

One record per document: its token ids, then eos, as int32 little-endian bytes (see
`data.shards`). A document goes to the validation split when the first 8 bytes of the
sha256 of its text, read as a fraction of 2**64, are below --val-fraction: a property of
the document alone, so adding inputs never moves an existing document between splits.

Shards are cut by documents (--shard-docs) or by input text bytes (--shard-bytes), both
known before tokenizing. So a shard's content is fixed by its documents and the tokenizer;
its plan hash (sha256 over those) is stored beside it when it is complete, and a re-run
skips shards whose plan hash and file sha256 still match. A shard is written under a
temporary name and renamed when whole, and metadata.json is written last: a crashed run
leaves no metadata and no shard that looks complete.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flaxpod.data.documents import (
    MAX_EXAMPLES,
    DocumentReader,
    RowFilter,
    document_hash,
    hash_below,
    input_files,
)
from flaxpod.data.progress import Progress
from flaxpod.data.shard_builder import SPLITS, STATE_DIR, ShardBuilder, TokenizerPool
from flaxpod.data.shards import FORMAT, write_json
from flaxpod.data.tokenizer import Tokenizer
from flaxpod.data.tokenizer_training import (
    DEFAULT_SAMPLE_BYTES,
    dataset_tokenizer,
    save_tokenizer,
    train_tokenizer_on_inputs,
)

FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
DEFAULT_SHARD_BYTES = 64 << 20
DEFAULT_VOCAB_SIZE = 8000
DEFAULT_MODEL_TYPE = "bpe"


def default_workers() -> int:
    """Tokenizer worker processes when --workers is not given."""
    return min(os.cpu_count() or 1, 8)


def is_validation(digest: bytes, val_fraction: float) -> bool:
    """The split rule: a document is validation iff `hash_below(its hash, val_fraction)`."""
    return hash_below(digest, val_fraction)


# ----------------------------------------------------------------------------- prepare


def _check_out_dir(out: Path, inputs: Sequence[str], files: Sequence[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not ((out / "metadata.json").exists() or (out / STATE_DIR).is_dir()):
            raise ValueError(
                f"--out {out}: directory is not empty and holds no prepared dataset; choose a new or empty directory"
            )
    # An output inside an input directory would be read back as input by the next run.
    resolved_out = out.resolve()
    for spec in inputs:
        spec_path = Path(spec).expanduser()
        if spec_path.is_dir() and spec_path.resolve() in (resolved_out, *resolved_out.parents):
            raise ValueError(f"--out {out} lies inside the input directory {spec}")
    for f in files:
        if resolved_out in f.resolve().parents:
            raise ValueError(f"input {f} lies inside the output directory {out}")


def prepare_dataset(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_type: str = DEFAULT_MODEL_TYPE,
    jsonl_field: str = "text",
    row_filter: RowFilter | None = None,
    val_fraction: float = 0.005,
    shard_docs: int | None = None,
    shard_bytes: int | None = None,
    workers: int | None = None,
    tokenizer_sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    command: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenize `inputs` into a prepared dataset in `out_dir`; returns its metadata.

    `tokenizer` is a tokenizer directory, a SentencePiece `.model` file or a `Tokenizer`;
    without it one is trained (`vocab_size`, `model_type`) on a sample of the inputs.
    Shards hold `shard_docs` documents each, or else about `shard_bytes` bytes of input
    text (default 64 MiB). Re-running with the same arguments rewrites nothing.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction: expected 0 <= f < 1, got {val_fraction}")
    if shard_docs is not None and shard_bytes is not None:
        raise ValueError("give --shard-docs or --shard-bytes, not both")
    if shard_docs is not None and shard_docs < 1:
        raise ValueError(f"--shard-docs: expected >= 1, got {shard_docs}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"--shard-bytes: expected >= 1, got {shard_bytes}")
    if shard_docs is None and shard_bytes is None:
        shard_bytes = DEFAULT_SHARD_BYTES
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {workers}")

    out = Path(out_dir)
    files = input_files(inputs)
    _check_out_dir(out, inputs, files)
    # The state directory marks `out` as ours, so a failed run can be re-run into it.
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    # Removed first: from here until the end, the directory must not look complete.
    (out / "metadata.json").unlink(missing_ok=True)

    start = time.perf_counter()
    tok, tok_info = dataset_tokenizer(
        tokenizer,
        files,
        out / TOKENIZER_DIR,
        out / STATE_DIR / "tokenizer.json",
        vocab_size=vocab_size,
        model_type=model_type,
        jsonl_field=jsonl_field,
        row_filter=row_filter,
        sample_bytes=tokenizer_sample_bytes,
        log=log,
    )
    tokenizer_seconds = time.perf_counter() - start

    reader = DocumentReader(files, jsonl_field=jsonl_field, row_filter=row_filter)
    bar = Progress("prepare", reader.total_disk_bytes(), enabled=progress)
    pool = TokenizerPool(tok, out / TOKENIZER_DIR, workers)
    builder = ShardBuilder(out, pool, bar, shard_docs=shard_docs, shard_bytes=shard_bytes)
    tokenize_start = time.perf_counter()
    try:
        for doc in reader:
            digest = document_hash(doc.text)
            builder.add("val" if is_validation(digest, val_fraction) else "train", doc, digest)
        shards = builder.finish()
    finally:
        pool.close()
    bar.close()
    tokenize_seconds = time.perf_counter() - tokenize_start

    splits = {
        split: {
            "documents": sum(s["documents"] for s in shards[split]),
            "tokens": sum(s["tokens"] for s in shards[split]),
            "shards": shards[split],
        }
        for split in SPLITS
    }
    if reader.stats.documents == 0:
        raise ValueError(f"inputs {list(inputs)} hold no text (all {len(files)} files empty)")
    if splits["train"]["documents"] == 0:
        raise ValueError(
            f"all {reader.stats.documents} documents fell into the validation split; "
            f"lower --val-fraction (now {val_fraction})"
        )
    if command is None:
        command = (
            "prepare_dataset("
            + ", ".join(
                [repr([str(i) for i in inputs]), repr(str(out))]
                + [
                    f"{k}={v!r}"
                    for k, v in (
                        ("tokenizer", None if isinstance(tokenizer, Tokenizer) else tokenizer),
                        ("vocab_size", vocab_size),
                        ("model_type", model_type),
                        ("jsonl_field", jsonl_field),
                        ("val_fraction", val_fraction),
                        ("shard_docs", shard_docs),
                        ("shard_bytes", shard_bytes),
                    )
                ]
            )
            + ")"
        )
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "command": command,
        "record": {
            "dtype": "int32",
            "byte_order": "little",
            "content": "token ids of one document" + (", then eos_id" if tok.eos_id is not None else ""),
        },
        "tokenizer": {
            "path": TOKENIZER_DIR,
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "pad_id": tok.pad_id,
            "fingerprint": tok.fingerprint(),
            **tok.describe(),
            **tok_info,
        },
        "inputs": [str(spec) for spec in inputs],
        "jsonl_field": jsonl_field,
        "row_filter": (row_filter or RowFilter()).as_dict(),
        "val_fraction": val_fraction,
        "split_rule": "val iff int(sha256(utf8 text)[:8], big-endian) < val_fraction * 2**64",
        "shard_docs": shard_docs,
        "shard_bytes": shard_bytes,
        "documents": splits["train"]["documents"] + splits["val"]["documents"],
        "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
        "reading": {
            **reader.stats.as_dict(),
            "documents_larger_than_a_shard": builder.oversized_documents,
        },
        "splits": splits,
    }
    write_json(out / "metadata.json", metadata)
    metadata_run = {
        "seconds_tokenizer": round(tokenizer_seconds, 3),
        "seconds_tokenize": round(tokenize_seconds, 3),
        "input_bytes": bar.total_bytes,
        "shards_reused": builder.reused,
        "workers": workers,
    }
    # Run facts (timings) are returned but kept out of metadata.json, which stays a pure
    # function of the inputs so that identical runs give identical files.
    return {**metadata, "run": metadata_run}


# ----------------------------------------------------------------------------- CLI


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ValueError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{self.prog}: {message}")


def parse_size(text: str) -> int:
    """'64M', '5GB', '1.5GiB', '500k' or '1048576' -> bytes (powers of 1024); an argparse `type`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 64M, 5GB or 1048576, got {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    return int(float(match.group(1)) * scale[match.group(2).lower()])


def _add_tokenizer_training_args(parser: argparse.ArgumentParser) -> None:
    # Defaults are filled in later, so that prepare can tell them from given values.
    parser.add_argument("--vocab-size", type=int, help=f"SentencePiece vocabulary size (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument(
        "--model-type",
        choices=("bpe", "unigram", "byte-bpe"),
        help=f"SentencePiece bpe or unigram, or byte-bpe: a byte-level BPE trained with `tokenizers` "
        f"(default {DEFAULT_MODEL_TYPE})",
    )
    parser.add_argument(
        "--text-field",
        "--jsonl-field",
        dest="jsonl_field",
        default="text",
        help="field holding the text in JSONL/Parquet rows, dotted for nested fields (default: text)",
    )
    parser.add_argument(
        "--min-field",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="skip rows whose numeric field NAME is missing or below NUMBER (repeatable)",
    )
    parser.add_argument(
        "--require-field",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="skip rows whose field NAME is not the string VALUE (repeatable)",
    )
    parser.add_argument(
        "--tokenizer-sample",
        type=parse_size,
        default=DEFAULT_SAMPLE_BYTES,
        help="input text to sample for training the tokenizer (default 256M)",
    )


def _prepare_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="flaxpod prepare", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="text/.gz/.jsonl files, directories, globs")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument(
        "--tokenizer", help="tokenizer directory or SentencePiece .model (default: train one on the inputs)"
    )
    _add_tokenizer_training_args(parser)
    parser.add_argument("--val-fraction", type=float, default=0.005)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-docs", type=int, help="documents per shard")
    size.add_argument("--shard-bytes", type=parse_size, help="input text bytes per shard, e.g. 64M (default 64M)")
    parser.add_argument(
        "--workers", type=int, default=None, help=f"tokenizer processes (default min(cpus, 8) = {default_workers()})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _command_line(prog: str, argv: Sequence[str]) -> str:
    return " ".join([prog, *map(shlex.quote, argv)])


def _fail(prog: str, error: Exception) -> int:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """`flaxpod prepare`; returns the exit code (2 on bad input, with one stderr line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _prepare_parser().parse_args(argv)
        if args.tokenizer and (args.vocab_size is not None or args.model_type is not None):
            raise ValueError(
                "--vocab-size and --model-type train a tokenizer; with "
                "--tokenizer the given one is used: drop one or the other"
            )
        args.vocab_size = args.vocab_size or DEFAULT_VOCAB_SIZE
        args.model_type = args.model_type or DEFAULT_MODEL_TYPE
        meta = prepare_dataset(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            jsonl_field=args.jsonl_field,
            row_filter=RowFilter.parse(args.min_field, args.require_field),
            val_fraction=args.val_fraction,
            shard_docs=args.shard_docs,
            shard_bytes=args.shard_bytes,
            workers=args.workers,
            tokenizer_sample_bytes=args.tokenizer_sample,
            command=_command_line("flaxpod prepare", argv),
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as e:
        return _fail("flaxpod prepare", e)
    print(summary(meta, args.out))
    return 0


def summary(meta: dict, out: str | os.PathLike) -> str:
    """Human-readable report of a `prepare_dataset` result."""
    run, reading = meta["run"], meta["reading"]
    seconds = run["seconds_tokenizer"] + run["seconds_tokenize"]
    lines = [
        f"prepared {out}: {meta['documents']} documents, {meta['tokens']:,} tokens "
        f"(train {meta['splits']['train']['tokens']:,} in "
        f"{len(meta['splits']['train']['shards'])} shards, val "
        f"{meta['splits']['val']['tokens']:,} in {len(meta['splits']['val']['shards'])})",
        f"time {seconds:.1f} s (tokenizer {run['seconds_tokenizer']:.1f} s, tokenize+write "
        f"{run['seconds_tokenize']:.1f} s at "
        f"{run['input_bytes'] / 1e6 / max(run['seconds_tokenize'], 1e-9):.2f} MB/s, "
        f"{run['workers']} workers); shards reused: {run['shards_reused']}",
        f"inputs: {reading['files']} files, {reading['text_bytes']:,} bytes of text; "
        f"{reading['empty_documents']} empty skipped; {reading['filtered_rows']} rows filtered out; "
        f"{reading['crlf_documents']} with CRLF; "
        f"{reading['replaced_bytes']} undecodable bytes replaced"
        + (
            f" in {reading['files_with_replacements']} files "
            f"({', '.join(reading['replacement_examples'])}"
            f"{', ...' if reading['files_with_replacements'] > MAX_EXAMPLES else ''})"
            if reading["files_with_replacements"]
            else ""
        )
        + f"; longest line {reading['longest_line_chars']:,} chars; "
        f"{reading['documents_larger_than_a_shard']} documents larger than a shard",
        f"tokenizer {meta['tokenizer']['kind']} vocab {meta['tokenizer']['vocab_size']} "
        f"sha256 {meta['tokenizer']['fingerprint']}",
    ]
    return "\n".join(lines)


def _tokenizer_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="flaxpod tokenizer",
        description="Train a SentencePiece or byte-level BPE (tokenizers) tokenizer on text inputs.",
    )
    parser.add_argument("inputs", nargs="+", help="text/.gz/.jsonl files, directories, globs")
    parser.add_argument("--out", required=True, help="directory to save the tokenizer in")
    _add_tokenizer_training_args(parser)
    parser.add_argument(
        "--no-byte-fallback", action="store_true", help="map unknown characters to <unk> instead of UTF-8 bytes"
    )
    return parser


def tokenizer_main(argv: list[str] | None = None) -> int:
    """`flaxpod tokenizer`: train a tokenizer on its own; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _tokenizer_parser().parse_args(argv)
        args.vocab_size = args.vocab_size or DEFAULT_VOCAB_SIZE
        args.model_type = args.model_type or DEFAULT_MODEL_TYPE
        files = input_files(args.inputs)
        start = time.perf_counter()
        tok, info = train_tokenizer_on_inputs(
            files,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            jsonl_field=args.jsonl_field,
            row_filter=RowFilter.parse(args.min_field, args.require_field),
            sample_bytes=args.tokenizer_sample,
            byte_fallback=not args.no_byte_fallback,
        )
        save_tokenizer(tok, Path(args.out))
    except (ValueError, FileNotFoundError) as e:
        return _fail("flaxpod tokenizer", e)
    print(
        f"saved a {args.model_type} tokenizer, vocab {tok.vocab_size}, to {args.out} in "
        f"{time.perf_counter() - start:.1f} s (sample: {info['sample_documents']} documents, "
        f"{info['sample_chars']:,} chars); sha256 {tok.fingerprint()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
