"""Whole tokenized SFT examples -> packed rows and batches: a first-fit plan made from lengths alone.

An example of n tokens t with loss mask m over its targets (m[j] belongs to t[j + 1]) fills n - 1
consecutive positions of a row: inputs t[:-1], targets t[1:], loss_mask m. Per row:

    inputs, targets  int32 token ids
    loss_mask        float32, 1.0 on response targets (responses and their EOS), 0.0 elsewhere
    segment_ids      int32, 1, 2, ... per example in the row, 0 on padding
    positions        int32, 0, 1, ... restarting at each example, 0 on padding

An example is never split across rows. Rows are planned by first fit over `bins` open rows: each
example, in order, goes into the first open row with room; when one fits in none, the open rows
are emitted and it opens a fresh set. These are exactly the rows of grain's
`FirstFitPackIterDataset(num_packing_bins=bins, shuffle_bins=False)` (tests check it row for row).

Why not that class itself (its state does restore exactly through JSON, tests check that too):
it spends about 1.2-1.5 ms of Python per example (measured on this project's shared 2-core
machine at a load of ~6), and for a process's rows to be a slice of the one global batch (so
that the batch does not depend on the process count), every process would have to pack every
row. Here only the plan, from lengths, is made everywhere (about 9 us per example at the same
load); each process then copies the tokens of its own rows only, and the state is two integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import grain
import numpy as np
from flaxpod.data.pipeline import local_batch_size

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class TokenizedExample(NamedTuple):
    """tokens int32[n]; loss_mask float32[n - 1], over the targets tokens[1:]."""

    tokens: np.ndarray
    loss_mask: np.ndarray


def first_fit_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int, bins: int) -> list[np.ndarray]:
    """Rows of example indices: examples `order` packed first-fit into `bins` open rows of seq_len.

    `lengths[i]` is the number of positions example i fills (its tokens minus one).
    """
    if bins < 1:
        raise ValueError(f"packing_bins: expected >= 1, got {bins}")
    rows: list[np.ndarray] = []
    free = np.full(bins, seq_len, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(bins)]
    for i in order.tolist():
        need = lengths[i]
        if need > seq_len:
            raise ValueError(f"example {i} fills {need} positions, more than seq_len={seq_len}")
        row = int(np.argmax(free >= need))
        if free[row] < need:  # fits in no open row: emit them and start afresh
            rows += [np.asarray(m) for m in members if m]
            free[:] = seq_len
            members = [[] for _ in range(bins)]
            row = 0
        members[row].append(i)
        free[row] -= need
    rows += [np.asarray(m) for m in members if m]
    return rows


def assemble_rows(rows: Sequence[np.ndarray], examples: Sequence[TokenizedExample], seq_len: int) -> Batch:
    """The batch of the given rows of example indices (layout in the module docstring)."""
    shape = (len(rows), seq_len)
    batch = {k: np.zeros(shape, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
    arange = np.arange(seq_len, dtype=np.int32)
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row.tolist(), 1):
            tokens, mask = examples[i]
            stop = start + len(tokens) - 1
            batch["inputs"][r, start:stop] = tokens[:-1]
            batch["targets"][r, start:stop] = tokens[1:]
            batch["loss_mask"][r, start:stop] = mask
            batch["segment_ids"][r, start:stop] = segment
            batch["positions"][r, start:stop] = arange[: stop - start]
            start = stop
    return batch


def packing_efficiency(batch: Batch) -> float:
    """Fraction of a batch's target positions holding a real token (not padding)."""
    return float(np.mean(batch["segment_ids"] > 0))


def _lengths(examples: Sequence[TokenizedExample], seq_len: int) -> np.ndarray:
    if seq_len < 1:
        raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
    if not examples:
        raise ValueError("no tokenized examples")
    lengths = np.array([len(e.tokens) - 1 for e in examples], dtype=np.int64)
    if lengths.max() > seq_len or lengths.min() < 1:
        raise ValueError(f"examples must have 2 to seq_len + 1 = {seq_len + 1} tokens (see sft.tokenize_examples)")
    return lengths


class SFTTrainIterator(grain.DatasetIterator):
    """Endless batches of this process's rows of each global batch; see `sft.make_sft_train_iterator`.

    Epoch e shuffles the examples with (seed, e), packs them first-fit and shuffles the rows; the
    epochs' rows form one endless stream and global batch k is its rows [kB, (k+1)B), of which this
    process takes rows p, p + P, ... The state is the stream position of the next batch, the same on
    every process: {"epoch": e, "row": r}.
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        *,
        seq_len: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        seed: int,
        packing_bins: int,
    ) -> None:
        super().__init__()
        local_batch_size(global_batch_size, process_index, process_count)
        self._examples = list(examples)
        self._lengths = _lengths(self._examples, seq_len)
        self._seq_len, self._bins = seq_len, packing_bins
        self._global_batch, self._process_index, self._process_count = global_batch_size, process_index, process_count
        # SeedSequence takes non-negative integers; masking keeps a negative seed distinct from others.
        self._seed = seed & (2**64 - 1)
        self._epoch, self._row = 0, 0
        self._planned_epoch, self._planned_rows = -1, []

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """The rows (arrays of example indices) of an epoch, in stream order."""
        if epoch != self._planned_epoch:
            rng = np.random.default_rng([self._seed, epoch])
            order = rng.permutation(len(self._examples))
            rows = first_fit_rows(self._lengths, order, self._seq_len, self._bins)
            self._planned_rows = [rows[j] for j in rng.permutation(len(rows))]
            self._planned_epoch = epoch
        return self._planned_rows

    def epoch_packing_efficiency(self, epoch: int = 0) -> float:
        """Fraction of an epoch's row positions holding real tokens."""
        rows = self.epoch_rows(epoch)
        return float(sum(self._lengths[r].sum() for r in rows) / (len(rows) * self._seq_len))

    def __next__(self) -> Batch:
        picked: list[np.ndarray] = []
        while len(picked) < self._global_batch:
            rows = self.epoch_rows(self._epoch)
            take = rows[self._row : self._row + self._global_batch - len(picked)]
            picked += take
            self._row += len(take)
            if self._row == len(rows):
                self._epoch, self._row = self._epoch + 1, 0
        mine = picked[self._process_index :: self._process_count]
        return assemble_rows(mine, self._examples, self._seq_len)

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "row": self._row}

    def set_state(self, state: dict[str, int]) -> None:
        epoch, row = state["epoch"], state["row"]
        if not (isinstance(epoch, (int, np.integer)) and isinstance(row, (int, np.integer)) and min(epoch, row) >= 0):
            raise ValueError(f"SFT iterator state: expected non-negative integers epoch and row, got {state}")
        epoch, row = int(epoch), int(row)
        if row >= len(self.epoch_rows(epoch)):
            raise ValueError(f"SFT iterator state {state}: epoch {epoch} has {len(self.epoch_rows(epoch))} rows")
        self._epoch, self._row = epoch, row

    def __str__(self) -> str:
        return f"SFTTrainIterator(examples={len(self._examples)}, seq_len={self._seq_len}, bins={self._bins})"


def eval_batches(
    examples: Sequence[TokenizedExample],
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    packing_bins: int,
    max_batches: int | None = None,
) -> list[Batch]:
    """This process's rows of the batches covering every example once, in stored order.

    The rows are packed first-fit in file order; the last global batch is filled up with empty
    rows (loss_mask 0). Every process gets the same number of batches.
    """
    local_batch_size(global_batch_size, process_index, process_count)
    lengths = _lengths(examples, seq_len)
    rows = first_fit_rows(lengths, np.arange(len(examples)), seq_len, packing_bins)
    rows += [np.zeros(0, np.int64)] * (-len(rows) % global_batch_size)
    starts = range(0, len(rows), global_batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    return [
        assemble_rows(rows[start + process_index : start + global_batch_size : process_count], examples, seq_len)
        for start in starts
    ]
