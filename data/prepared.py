"""Prepared datasets (see `data.prepare`) -> packed training and evaluation batches, with Grain.

Training pipeline, per dataset:

    ArrayRecord shards -> global shuffle by seed (a new order each epoch) -> endless repeat
    -> this host's part (documents p, p + P, p + 2P, ... of the shuffled order: disjoint
    across hosts, together all of it) -> packing into rows of seq_len (`data.packing`,
    row for row what Grain's ConcatThenSplitIterDataset gives, many times faster)

then mixing of the datasets' rows by weight, a shuffle of rows within a window, batching,
and prefetch in threads (or worker processes).

Packing concatenates documents into rows and splits a document at a row's end; the rest
opens the next row as a new segment. Each document (or piece) is one segment, so:

    segment_ids  1, 2, ... per piece within a row, 0 on padding
    positions    0, 1, ... restarting at each piece
    loss_mask    1.0 wherever segment_ids > 0

Inputs and targets are packed as a pair, so every target is the next token of the same
document as its input: no loss ever spans two documents, and no token is lost where a
document is split. Padding only appears at the very end of a finite stream (evaluation).
Rows are mixed whole, so a mixture's weights are its proportions of rows, i.e. of tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from absl import flags
from flaxpod.data.packing import PackedRowsIterDataset, decode_group
from flaxpod.data.pipeline import local_batch_size
from flaxpod.data.shards import FORMAT
from grain.experimental import WindowShuffleIterDataset

Batch = dict[str, np.ndarray]
SUPPORTED_VERSIONS = (1,)
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def load_dataset_metadata(dataset_dir: str | os.PathLike) -> dict:
    """The metadata of a prepared dataset, checked: format, keys and every shard file.

    Raises FileNotFoundError when the directory or a listed shard is missing, ValueError
    when metadata.json is corrupt or of an unknown format.
    """
    path = Path(dataset_dir) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset_dir}: not a prepared dataset (no metadata.json; an interrupted "
            f"`flaxpod prepare` leaves none: run it again with --out {dataset_dir})"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format is not {FORMAT!r}")
    if meta.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: version {meta.get('version')!r}, this flaxpod reads {SUPPORTED_VERSIONS}")
    for key in ("tokenizer", "splits", "documents", "tokens"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    if "fingerprint" not in meta["tokenizer"]:
        raise ValueError(f"{path}: missing key 'tokenizer.fingerprint'")
    for split in ("train", "val"):
        for shard in meta["splits"].get(split, {}).get("shards", []):
            shard_path = Path(dataset_dir) / shard["path"]
            if not shard_path.is_file():
                raise FileNotFoundError(f"{dataset_dir}: shard {shard['path']} is missing")
            if shard_path.stat().st_size != shard["bytes"]:
                raise ValueError(
                    f"{shard_path}: {shard_path.stat().st_size} bytes, metadata says "
                    f"{shard['bytes']}: the shard changed after it was prepared"
                )
    return meta


def _check_tokenizers(
    dataset_dirs: Sequence[str | os.PathLike],
    metas: Sequence[dict],
    tokenizer_fingerprint: str | None,
) -> None:
    """All datasets share one tokenizer, and it is the expected one if one is given."""
    first = metas[0]["tokenizer"]["fingerprint"]
    for path, meta in zip(dataset_dirs, metas, strict=True):
        found = meta["tokenizer"]["fingerprint"]
        if tokenizer_fingerprint is not None and found != tokenizer_fingerprint:
            raise ValueError(
                f"{path}: shards were tokenized with tokenizer sha256 {found}, but this run's "
                f"tokenizer is sha256 {tokenizer_fingerprint}"
            )
        if found != first:
            raise ValueError(
                f"{path}: tokenizer sha256 {found} differs from {dataset_dirs[0]}'s {first}; "
                "a mixture needs one tokenizer"
            )


def split_shard_paths(dataset_dir: str | os.PathLike, meta: dict, split: str) -> list[str]:
    """Paths of a split's shard files, in order."""
    shards = meta["splits"].get(split, {}).get("shards", [])
    return [str(Path(dataset_dir) / shard["path"]) for shard in shards]


def _shuffle_seed(seed: int, dataset_index: int) -> int:
    # Grain reshuffles epoch e with its seed + e; hashing first keeps runs with seeds s and
    # s + 1 (or datasets 0 and 1) from replaying each other's epochs.
    return int(np.random.SeedSequence([seed, dataset_index]).generate_state(1)[0])


def host_documents(
    dataset_dir: str | os.PathLike,
    split: str,
    *,
    seed: int | None,
    process_index: int = 0,
    process_count: int = 1,
    dataset_index: int = 0,
    repeat: bool = True,
) -> grain.MapDataset:
    """This host's documents (records) of a split: shuffled globally, then every P-th.

    `seed=None` keeps the stored order. With `repeat`, the dataset is endless and each
    epoch is shuffled anew; hosts' parts are disjoint and cover every epoch together.
    """
    meta = load_dataset_metadata(dataset_dir)
    paths = split_shard_paths(dataset_dir, meta, split)
    if not paths:
        raise ValueError(f"{dataset_dir}: the {split!r} split has no documents")
    ds = grain.MapDataset.source(_BatchedArrayRecordSource(paths))
    if seed is not None:
        ds = ds.shuffle(seed=_shuffle_seed(seed, dataset_index))
    if repeat:
        ds = ds.repeat()
    return ds[process_index::process_count]


def read_split_documents(dataset_dir: str | os.PathLike, split: str) -> list[np.ndarray]:
    """Every document of a split in stored order, as token-id arrays (for evaluation)."""
    documents = host_documents(dataset_dir, split, seed=None, repeat=False)
    return decode_group([documents[i] for i in range(len(documents))])


class _BatchedArrayRecordSource(grain.sources.ArrayRecordDataSource):
    """ArrayRecord source that Grain reads in batches.

    Grain's source dataset reads a batch with one `_getitems` call when its source has
    that method (`SupportsBatchedReadRandomAccessDataSource`); ArrayRecord spells it
    `__getitems__` and reads the records in parallel in C++. Batched, a group of 32
    shuffled records reads about 3x faster than 32 single reads on this machine.
    """

    def _getitems(self, indices: Sequence[int]) -> Sequence[bytes]:
        return self.__getitems__(indices)


class _DocumentGroups(grain.MapDataset):
    """Element g: the token ids of records [g * size, (g + 1) * size) of the parent.

    Unlike `MapDataset.batch`, reads the group with one `_getitems` call down to the
    source (`MapDataset.batch` pushes batches down only behind a disabled experiment).
    """

    def __init__(self, parent: grain.MapDataset, size: int) -> None:
        super().__init__(parent)
        self._size = size

    def __len__(self) -> int:
        return -(-len(self._parent) // self._size)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        start = index * self._size
        stop = min(start + self._size, len(self._parent))
        return decode_group(self._parent._getitems(list(range(start, stop))))

    def __str__(self) -> str:
        return f"_DocumentGroups(size={self._size})"


GROUP_TOKENS = 1 << 18
MAX_GROUP_SIZE = 256


def group_size_for(meta: dict, split: str) -> int:
    """Documents per read group: about GROUP_TOKENS tokens, by the split's mean length.

    Big groups amortize per-read overhead on short documents (web pages, rows); one
    document a group keeps memory small on books of megabytes. A group never exceeds a
    quarter of the split: reading far ahead of a tiny dataset only delays the first batch
    (Grain's index shuffle costs milliseconds per index below a thousand documents).
    """
    info = meta["splits"].get(split, {})
    documents = max(info.get("documents", 0), 1)
    mean = info.get("tokens", 0) / documents
    by_tokens = GROUP_TOKENS // max(mean, 1)
    return int(max(1, min(MAX_GROUP_SIZE, by_tokens, documents // 4)))


def pack_documents(
    documents: grain.MapDataset,
    seq_len: int,
    *,
    group_size: int = 32,
    read_threads: int = 2,
    read_groups: int = 4,
) -> grain.IterDataset:
    """Rows of `seq_len` packed from a dataset of records (see `data.packing`).

    Records are read and decoded `group_size` at a time in `read_threads` threads, at
    most `read_groups` groups ahead.
    """
    groups = _DocumentGroups(documents, group_size)
    stream = groups.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_groups))
    return PackedRowsIterDataset(stream, seq_len=seq_len)


def _to_batch(rows: dict[str, np.ndarray]) -> Batch:
    return {
        "inputs": rows["inputs"],
        "targets": rows["targets"],
        "segment_ids": rows["segment_ids"],
        "positions": rows["positions"],
        "loss_mask": (rows["segment_ids"] > 0).astype(np.float32),
    }


def _normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"weights: {len(weights)} given for {count} datasets")
    if any(not w > 0 for w in weights):
        raise ValueError(f"weights: each must be > 0, got {list(weights)}")
    total = float(sum(weights))
    return [w / total for w in weights]


def make_packed_train_dataset(
    dataset_dirs: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer_fingerprint: str | None = None,
    worker_processes: int = 0,
    shuffle_window_rows: int = 1024,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
    """The endless training `IterDataset` behind `make_packed_train_iterator`."""
    if not dataset_dirs:
        raise ValueError("no datasets given")
    local_batch = local_batch_size(global_batch_size, process_index, process_count)
    metas = [load_dataset_metadata(d) for d in dataset_dirs]
    _check_tokenizers(dataset_dirs, metas, tokenizer_fingerprint)
    mix_weights = _normalized_weights(weights, len(dataset_dirs))
    streams = [
        pack_documents(
            host_documents(
                d, "train", seed=seed, process_index=process_index, process_count=process_count, dataset_index=i
            ),
            seq_len,
            group_size=group_size_for(meta, "train"),
        )
        for i, (d, meta) in enumerate(zip(dataset_dirs, metas, strict=True))
    ]
    rows = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, mix_weights)
    if shuffle_window_rows > 1:
        # Packing emits a long document as consecutive rows; shuffling rows within a window
        # keeps one batch from being many slices of the same book.
        rows = WindowShuffleIterDataset(
            rows, window_size=shuffle_window_rows, seed=_shuffle_seed(seed, len(dataset_dirs))
        )
    batches = rows.batch(local_batch, drop_remainder=True).map(_to_batch)
    if worker_processes > 0:
        # Grain reads absl flags in its workers; outside absl.app.run nobody parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_processes, per_worker_buffer_size=prefetch_batches)
        )
    else:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch_batches)
    return batches


def make_packed_train_iterator(
    dataset_dirs: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer_fingerprint: str | None = None,
    worker_processes: int = 0,
    shuffle_window_rows: int = 1024,
    prefetch_batches: int = 4,
) -> grain.DatasetIterator:
    """Endless iterator of this host's packed training batches (see module docstring).

    Each batch is a dict of arrays [global_batch_size // process_count, seq_len]: inputs,
    targets, segment_ids, positions (int32) and loss_mask (float32). `weights` mixes the
    datasets by rows (default equal). `tokenizer_fingerprint`, when given, must equal the
    datasets' tokenizer sha256. Rows are shuffled within windows of `shuffle_window_rows`
    (0 turns it off), so that a batch is not consecutive slices of one long document.
    `prefetch_batches` are prepared ahead in a thread, or in `worker_processes` processes
    when > 0 (then the batches depend on the worker count). The iterator's `get_state()`
    is a small JSON-able dict; `set_state()` resumes exactly (same arguments and process
    count); call `close()` when done.
    """
    return iter(
        make_packed_train_dataset(
            dataset_dirs,
            weights,
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            tokenizer_fingerprint=tokenizer_fingerprint,
            worker_processes=worker_processes,
            shuffle_window_rows=shuffle_window_rows,
            prefetch_batches=prefetch_batches,
        )
    )


def make_packed_eval_batches(
    dataset_dirs: Sequence[str | os.PathLike],
    *,
    seq_len: int,
    global_batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
    """This host's rows of the first `num_batches` global batches of validation data.

    The validation splits are packed in stored order, datasets one after another. Every
    host packs the same global rows and keeps rows p, p + P, ... of each global batch, so
    the batches (as sets of rows) do not depend on the process count. The last batch is
    padded with empty rows (loss_mask 0); fewer than `num_batches` come back, the same
    number on every host, when the splits run out.
    """
    local_batch = local_batch_size(global_batch_size, process_index, process_count)
    if num_batches < 1:
        raise ValueError(f"num_batches: expected >= 1, got {num_batches}")
    parts, group_size = [], MAX_GROUP_SIZE
    for d in dataset_dirs:
        meta = load_dataset_metadata(d)
        if split_shard_paths(d, meta, "val"):
            parts.append(host_documents(d, "val", seed=None, repeat=False))
            group_size = min(group_size, group_size_for(meta, "val"))
    if not parts:
        raise ValueError(
            f"no validation documents in {[os.fspath(d) for d in dataset_dirs]}: prepare with a larger --val-fraction"
        )
    documents = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    rows = []
    for row in pack_documents(documents, seq_len, group_size=group_size):
        rows.append(row)
        if len(rows) == num_batches * global_batch_size:
            break
    empty = {k: np.zeros(seq_len, np.int32) for k in rows[0]}
    rows += [empty] * (-len(rows) % global_batch_size)
    batches = []
    for start in range(0, len(rows), global_batch_size):
        mine = rows[start + process_index : start + global_batch_size : process_count]
        assert len(mine) == local_batch
        stacked = {k: np.stack([r[k] for r in mine]) for k in empty}
        batches.append(_to_batch(stacked))
    return batches


def packing_efficiency(batch: Batch) -> float:
    """Fraction of positions whose target is a real next token: mean of loss_mask."""
    return float(np.mean(batch["loss_mask"]))
