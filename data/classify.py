"""Text classification data: CSV/TSV/JSONL files -> labels -> token rows -> Grain batches.

Files, chosen by extension:

    .csv    the csv module's default dialect: fields may be quoted, and a quoted field may
            hold commas, doubled quotes and newlines (as in banking77); a header row names
            the columns
    .tsv    tab-separated with a header, no quoting (quotes are text, as in GLUE's files): a
            field cannot hold a tab or a newline
    .jsonl  one JSON object a line; the text a string, the label a string or an integer

Blank lines are skipped. Text and label columns are named by `text_field` / `label_field`.
Every example remembers its `row` (1-based, header not counted) and the `line` where it
starts, and every error names the file and both.

Labels are the distinct labels of the training file, sorted as strings, or numerically
when every label is an integer (so "2" < "10"): the order, hence the ids, depends only on
the set of labels, never on row order or on the run. `labels.json` stores them.

Encoding: each text becomes at most seq_len tokens, truncated at the end (the start is
kept), optionally ending in EOS. No packing: one example per row. A batch holds this
process's rows of a global batch, as numpy arrays:

    inputs       int32 [b, seq_len]  token ids, 0 on padding
    segment_ids  int32 [b, seq_len]  1 on tokens, 0 on padding
    positions    int32 [b, seq_len]  0, 1, ... on tokens, 0 on padding
    labels       int32 [b]           label id; -1 on a padding row or an unlabelled example
    index        int32 [b]           the example's index in its file (order read); -1 on padding

Training batches come from an endless, checkpointable Grain iterator, reshuffled every
epoch; process p of P takes elements p, p + P, ... of the shuffled stream, so the union of
the processes' step-k batches is the one-process step-k batch. Evaluation batches cover
every example exactly once, in file order, the last global batch padded with empty rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grain
import numpy as np
from flaxpod.data.jsonl import json_type, read_jsonl
from flaxpod.data.pipeline import local_batch_size
from flaxpod.data.tokenizer import Tokenizer, _write_atomically
from flaxpod.model.errors import InputError

Batch = dict[str, np.ndarray]
LABELS_FILE = "labels.json"
EXTENSIONS = (".csv", ".tsv", ".jsonl")


class Example(NamedTuple):
    """One example of a file; `label` is None when the file is read without labels."""

    text: str
    label: str | None
    row: int  # 1-based among examples (the header and blank lines are not counted)
    line: int  # 1-based line of the file where the example starts


def where(path: str | Path, example: Example) -> str:
    """`PATH row R (line L)`: how errors name an example."""
    return f"{path} row {example.row} (line {example.line})"


# ---------------------------------------------------------------- reading files


def read_examples(path: str | Path, text_field: str = "text", label_field: str | None = "label") -> list[Example]:
    """The examples of a .csv, .tsv or .jsonl file, in file order.

    `label_field=None` reads texts only (label None), e.g. for prediction. Raises
    InputError, one line naming the file, row and column, for: an unknown extension, a
    missing file, non-UTF-8 bytes, an empty file, a missing column, a row with more or
    fewer fields than the header, broken CSV quoting, invalid JSON, a text that is not a
    string, empty text (only whitespace) or an empty label.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise InputError(f"{path}: unknown extension {path.suffix!r}; expected one of {', '.join(EXTENSIONS)}")
    if suffix == ".jsonl":
        examples = _read_jsonl(path, text_field, label_field)
    else:
        content = _read_utf8(path)
        delimiter, quoting = (",", csv.QUOTE_MINIMAL) if suffix == ".csv" else ("\t", csv.QUOTE_NONE)
        examples = _read_delimited(path, content, delimiter, quoting, text_field, label_field)
    if not examples:
        raise InputError(f"{path}: no examples (the file has no data rows)")
    return examples


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a .csv, .tsv or .jsonl file") from None
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs put before a CSV header.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path} line {line}: not UTF-8 text (byte offset {e.start}: {data[e.start : e.start + 1]!r})"
        ) from None


def _checked(path: Path, ex: Example, text_field: str, label_field: str | None) -> Example:
    if not ex.text.strip():
        raise InputError(f"{where(path, ex)}: empty text in column {text_field!r}")
    if label_field is not None and ex.label == "":
        raise InputError(f"{where(path, ex)}: empty label in column {label_field!r}")
    return ex


def _read_delimited(
    path: Path, content: str, delimiter: str, quoting: int, text_field: str, label_field: str | None
) -> list[Example]:
    # newline="" hands line ends to the csv module, which keeps newlines inside quoted fields.
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    header: list[str] | None = None
    text_column = label_column = -1
    examples: list[Example] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise InputError(f"{path} line {reader.line_num}: bad CSV ({e})") from None
        if not fields:  # a blank line
            continue
        if header is None:
            header = fields
            text_column = _column(path, header, text_field, "text")
            label_column = _column(path, header, label_field, "label")
            continue
        row = len(examples) + 1
        if len(fields) != len(header):
            raise InputError(
                f"{path} row {row} (line {start}): {len(fields)} fields, the header has {len(header)}"
                + (" (an unquoted comma in the text? quote the field)" if delimiter == "," else "")
            )
        label = fields[label_column] if label_field is not None else None
        examples.append(_checked(path, Example(fields[text_column], label, row, start), text_field, label_field))
    if header is None:
        raise InputError(f"{path}: empty file (no header row)")
    return examples


def _column(path: Path, header: list[str], name: str | None, kind: str) -> int:
    """Index of column `name` in the header; -1 for `name=None` (no label column)."""
    if name is None:
        return -1
    if name not in header:
        raise InputError(f"{path} line 1: no {kind} column {name!r} (the header has: {', '.join(header)})")
    return header.index(name)


def _read_jsonl(path: Path, text_field: str, label_field: str | None) -> list[Example]:
    examples: list[Example] = []
    for line_number, record in read_jsonl(path):  # the file, UTF-8, JSON and object checks
        at = f"{path} row {len(examples) + 1} (line {line_number})"
        text = _field(record, text_field, "text", at)
        if not isinstance(text, str):
            raise InputError(f"{at}: field {text_field!r} is {json_type(text)}, expected a string")
        label = None
        if label_field is not None:
            label = _field(record, label_field, "label", at)
            # bool is an int in Python, but true/false as a class is far more likely a mistake.
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise InputError(f"{at}: field {label_field!r} is {json_type(label)}, expected a string or an integer")
            label = str(label)
        examples.append(_checked(path, Example(text, label, len(examples) + 1, line_number), text_field, label_field))
    return examples


def _field(record: dict, name: str, kind: str, at: str) -> Any:
    if name not in record:
        raise InputError(f"{at}: no {kind} field {name!r} (fields: {', '.join(record) or 'none'})")
    return record[name]


# ---------------------------------------------------------------- labels

_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


def collect_labels(examples: Sequence[Example], path: str | Path) -> list[str]:
    """The sorted distinct labels of the training examples (see the module docstring).

    Raises InputError when an example has no label or when there are fewer than 2 classes.
    """
    found = {ex.label for ex in examples}
    if None in found:
        raise InputError(f"{path}: examples read without a label column cannot define the labels")
    if len(found) < 2:
        raise InputError(
            f"{path}: every one of the {len(examples)} examples has the label {next(iter(found))!r}; "
            "classification needs at least 2 classes"
        )
    return sort_labels(found)


def sort_labels(labels: Sequence[str] | set[str]) -> list[str]:
    """Sorted numerically when every label is an integer, else as strings."""
    if all(_INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _check_labels(labels: Any, source: str) -> list[str]:
    if not isinstance(labels, list) or not all(isinstance(label, str) and label for label in labels):
        raise InputError(f"{source}: labels must be a list of non-empty strings")
    if len(set(labels)) != len(labels):
        duplicate = next(label for label in labels if labels.count(label) > 1)
        raise InputError(f"{source}: label {duplicate!r} appears twice")
    if len(labels) < 2:
        raise InputError(f"{source}: {len(labels)} label(s); classification needs at least 2")
    return labels


def save_labels(path: str | Path, labels: Sequence[str]) -> None:
    """Write `{"labels": [...]}` (id i is labels[i]) to `path`, atomically."""
    labels = _check_labels(list(labels), str(path))
    text = json.dumps({"labels": labels}, ensure_ascii=False, indent=1) + "\n"
    _write_atomically(Path(path), text.encode("utf-8"))


def load_labels(path: str | Path) -> list[str]:
    """The labels saved by `save_labels`, checked."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (a classification run saves its labels there)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a labels file ({e})") from None
    if not isinstance(spec, dict) or "labels" not in spec:
        raise InputError(f'{path}: not a labels file (expected {{"labels": [...]}})')
    return _check_labels(spec["labels"], str(path))


def class_weights(label_ids: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency class weights, float32 [n_classes]: n_samples / (n_classes * count).

    scikit-learn's "balanced" weights: a class seen half as often weighs twice as much, and
    weights averaged over the training examples give 1. Every class needs an example.
    """
    label_ids = np.asarray(label_ids)
    if label_ids.size == 0 or label_ids.min() < 0 or label_ids.max() >= n_classes:
        raise ValueError(f"class_weights: label ids must be in [0, {n_classes}), got {label_ids.size} ids")
    counts = np.bincount(label_ids, minlength=n_classes)
    if not counts.all():
        raise ValueError(f"class_weights: class {int(np.argmin(counts))} has no training examples")
    return (label_ids.size / (n_classes * counts)).astype(np.float32)


# ---------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedExamples:
    """Token ids of a file's examples (ragged, concatenated), their label ids and counts."""

    token_ids: np.ndarray  # int32 [total tokens]: example i is token_ids[offsets[i]:offsets[i + 1]]
    offsets: np.ndarray  # int64 [n + 1]
    label_ids: np.ndarray  # int32 [n]; -1 for an unlabelled example
    seq_len: int
    truncated: int  # examples longer than seq_len tokens, cut to their first seq_len
    max_tokens: int  # longest example before truncation (EOS included when appended)

    def __len__(self) -> int:
        return len(self.label_ids)

    def tokens(self, i: int) -> np.ndarray:
        """Token ids of example i (at most seq_len)."""
        return self.token_ids[self.offsets[i] : self.offsets[i + 1]]

    def stats(self) -> dict[str, int | float]:
        """Counts to log: examples, truncated, max_tokens, mean_tokens (after truncation)."""
        return {
            "examples": len(self),
            "truncated": self.truncated,
            "max_tokens": self.max_tokens,
            "mean_tokens": float(self.offsets[-1] / max(len(self), 1)),
        }


def encode_examples(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    labels: Sequence[str],
    seq_len: int,
    path: str | Path,
    *,
    append_eos: bool = False,
) -> EncodedExamples:
    """Token ids and label ids of `examples` (read from `path`, which errors name).

    A label not in `labels` (those of the training file) is an InputError naming the row;
    an example without a label gets id -1.
    """
    label_id = {label: i for i, label in enumerate(labels)}
    ids = np.empty(len(examples), np.int32)
    for i, ex in enumerate(examples):
        if ex.label is None:
            ids[i] = -1
        elif ex.label in label_id:
            ids[i] = label_id[ex.label]
        else:
            raise InputError(
                f"{where(path, ex)}: label {ex.label!r} is not among the {len(labels)} labels of the training file"
            )
    texts = [ex.text for ex in examples]
    return _encode(texts, ids, tokenizer, seq_len, append_eos, lambda i: where(path, examples[i]))


def encode_texts(
    texts: Sequence[str], tokenizer: Tokenizer, seq_len: int, *, append_eos: bool = False
) -> EncodedExamples:
    """Unlabelled texts (label id -1), e.g. for `predict --text`; errors name text i (1-based)."""
    for i, text in enumerate(texts):
        if not text.strip():
            raise InputError(f"text {i + 1}: empty text")
    ids = np.full(len(texts), -1, np.int32)
    return _encode(list(texts), ids, tokenizer, seq_len, append_eos, lambda i: f"text {i + 1}")


def _encode(
    texts: list[str],
    label_ids: np.ndarray,
    tokenizer: Tokenizer,
    seq_len: int,
    append_eos: bool,
    name: Callable[[int], str],
) -> EncodedExamples:
    if seq_len < 1:
        raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
    if append_eos and tokenizer.eos_id is None:
        raise InputError(f"append_eos: the {tokenizer.kind} tokenizer has no EOS token")
    try:
        encoded = tokenizer.encode_batch(texts)
    except ValueError:
        # The batch call does not say which text failed: find it.
        for i, text in enumerate(texts):
            try:
                tokenizer.encode(text)
            except ValueError as e:
                raise InputError(f"{name(i)}: the tokenizer cannot encode the text: {e}") from None
        raise
    eos = [tokenizer.eos_id] if append_eos else []
    kept, lengths, truncated, max_tokens = [], np.zeros(len(texts), np.int64), 0, 0
    for i, ids in enumerate(encoded):
        if not ids:
            raise InputError(f"{name(i)}: the text encodes to no tokens")
        full = len(ids) + len(eos)
        max_tokens = max(max_tokens, full)
        if full > seq_len:
            truncated += 1
        # Keep the start (right-side truncation, as Hugging Face tokenizers do by default);
        # EOS, when asked for, stays the last token, where last-token pooling reads.
        row = ids[: seq_len - len(eos)] + eos
        kept.append(np.asarray(row, np.int32))
        lengths[i] = len(row)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    token_ids = np.concatenate(kept) if kept else np.zeros(0, np.int32)
    return EncodedExamples(token_ids, offsets, label_ids, seq_len, truncated, max_tokens)


# ---------------------------------------------------------------- batches


def rows_to_batch(encoded: EncodedExamples, indices: np.ndarray) -> Batch:
    """A batch of the examples `indices`, one row each; index -1 gives an empty row."""
    b, seq_len = len(indices), encoded.seq_len
    inputs = np.zeros((b, seq_len), np.int32)
    segment_ids = np.zeros((b, seq_len), np.int32)
    labels = np.full(b, -1, np.int32)
    for r, i in enumerate(indices):
        if i >= 0:
            tokens = encoded.tokens(i)
            inputs[r, : len(tokens)] = tokens
            segment_ids[r, : len(tokens)] = 1
            labels[r] = encoded.label_ids[i]
    positions = np.where(segment_ids > 0, np.arange(seq_len, dtype=np.int32), 0).astype(np.int32)
    return {
        "inputs": inputs,
        "segment_ids": segment_ids,
        "positions": positions,
        "labels": labels,
        "index": np.asarray(indices, np.int32),
    }


def make_classify_train_iterator(
    encoded: EncodedExamples,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch_threads: int = 1,
) -> grain.DatasetIterator:
    """Endless iterator of this process's rows of each global training batch.

    Examples are shuffled with `seed` and reshuffled every epoch; a batch may straddle two
    epochs (none is dropped). Every example must be labelled. `it.get_state()` is a small
    JSON-able dict and `it.set_state(state)` resumes exactly (same arguments and process
    count).
    """
    local_batch = local_batch_size(global_batch_size, process_index, process_count)
    if len(encoded) == 0 or (encoded.label_ids < 0).any():
        raise ValueError("make_classify_train_iterator: needs at least one example, all labelled")
    if len(encoded) >= 2**32:  # Grain's index shuffle works on 32-bit indices
        raise ValueError(f"{len(encoded)} examples exceed Grain's 2**32 shuffle limit")
    # Grain reshuffles epoch e with seed + e; hashing the seed first keeps runs with seeds
    # s and s + 1 from replaying each other's epochs.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ds = (
        grain.MapDataset.range(len(encoded))
        .shuffle(seed=shuffle_seed)
        .repeat()[process_index::process_count]
        .batch(local_batch, drop_remainder=True)
        .map(lambda indices: rows_to_batch(encoded, indices))
    )
    read = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2 * prefetch_threads)
    return iter(ds.to_iter_dataset(read))


class EvalBatches(Sequence[Batch]):
    """This process's evaluation batches, built when indexed (a test set is never held as
    padded arrays all at once)."""

    def __init__(self, encoded: EncodedExamples, rows: np.ndarray):
        self._encoded, self._rows = encoded, rows  # rows: [batches, local batch] example indices

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, k):  # an int or a slice, as Sequence asks
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        return rows_to_batch(self._encoded, self._rows[k])


def make_classify_eval_batches(
    encoded: EncodedExamples,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> EvalBatches:
    """This process's rows of every global batch over all examples, in file order.

    ceil(n / global_batch_size) batches on every process; the last global batch is padded
    with empty rows (segment_ids 0, labels -1, index -1), so each example is in exactly one
    row of one process. Process p holds rows p, p + P, ... of each global batch. Iterate it
    as often as needed; each batch is built when read.
    """
    local_batch_size(global_batch_size, process_index, process_count)
    n_batches = max(1, math.ceil(len(encoded) / global_batch_size))
    order = np.full(n_batches * global_batch_size, -1, np.int64)
    order[: len(encoded)] = np.arange(len(encoded))
    return EvalBatches(encoded, order.reshape(n_batches, global_batch_size)[:, process_index::process_count])
