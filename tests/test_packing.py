"""data.packing: rows equal Grain's ConcatThenSplit's, and restore exactly from JSON."""

import functools
import json

import grain
import numpy as np
import pytest
from flaxpod.data.packing import PackedRowsIterDataset
from grain.experimental import ConcatThenSplitIterDataset

ROW_KEYS = {
    "inputs": "inputs",
    "targets": "targets",
    "segment_ids": "inputs_segment_ids",
    "positions": "inputs_positions",
}


def documents(seed=0, n=150):
    rng = np.random.default_rng(seed)
    # Lengths 1 (no pair), exactly seq_len + 1 (fills a row), and longer than two rows.
    lengths = list(rng.integers(1, 40, size=n)) + [9] * 12 + [1, 1, 2, 30, 17, 9]
    rng.shuffle(lengths)
    return [rng.integers(4, 1000, size=n).astype(np.int32) for n in lengths]


def packed(docs, seq_len, group_size):
    groups = grain.MapDataset.source(docs).batch(group_size, batch_fn=list).to_iter_dataset()
    return PackedRowsIterDataset(groups, seq_len=seq_len)


@functools.cache
def grain_rows(seq_len):
    pairs = [{"inputs": d[:-1], "targets": d[1:]} for d in documents() if len(d) > 1]
    return list(
        ConcatThenSplitIterDataset(
            grain.MapDataset.source(pairs).to_iter_dataset(),
            length_struct={"inputs": seq_len, "targets": seq_len},
        )
    )


@pytest.mark.parametrize("group_size", [1, 3, 64])
@pytest.mark.parametrize("seq_len", [8, 37])
def test_rows_equal_grain_concat_then_split(group_size, seq_len):
    reference = grain_rows(seq_len)
    rows = list(packed(documents(), seq_len, group_size))
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference, strict=True):
        for key, ref_key in ROW_KEYS.items():
            assert row[key].dtype == np.int32
            np.testing.assert_array_equal(row[key], ref[ref_key])
    # Only the last row is padded.
    assert all((r["segment_ids"] > 0).all() for r in rows[:-1])
    assert (rows[-1]["segment_ids"] == 0).any()


def test_restore_from_any_json_state_is_exact():
    docs = documents(seed=1, n=30)
    ds = packed(docs, seq_len=9, group_size=4)
    it = iter(ds)
    states, rows = [], []
    for row in it:
        states.append(json.loads(json.dumps(it.get_state())))
        rows.append(row)
    states.insert(0, json.loads(json.dumps(iter(ds).get_state())))
    for k in range(0, len(rows), 3):
        restored = iter(ds)
        restored.set_state(states[k])
        rest = list(restored)
        assert len(rest) == len(rows) - k
        for a, b in zip(rest, rows[k:], strict=True):
            for key in ROW_KEYS:
                np.testing.assert_array_equal(a[key], b[key])


def test_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        packed(documents(n=3), seq_len=0, group_size=1)
