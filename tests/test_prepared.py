"""Packed Grain batches from prepared datasets: contract, hosts, mixtures, exact restore."""

import json
import random
import shutil

import numpy as np
import pytest
from flaxpod.data.prepare import prepare_dataset
from flaxpod.data.prepared import (
    BATCH_KEYS,
    host_documents,
    load_dataset_metadata,
    make_packed_eval_batches,
    make_packed_train_iterator,
    packing_efficiency,
)
from flaxpod.data.shards import decode_record
from flaxpod.data.tokenizer import CharTokenizer, train_sentencepiece

WORDS = "the a cat sat on mat dog ran far away and then home quick brown fox".split()


def write_docs(root, texts):
    root.mkdir(parents=True)
    for i, text in enumerate(texts):
        (root / f"d{i:04d}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def sp_dataset(tmp_path_factory):
    """60 documents of 1 to ~200 tokens, in several shards, with a validation split."""
    base = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    texts = [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for i in range(60)]
    tok = train_sentencepiece(texts, 320)
    prepare_dataset(
        [str(write_docs(base / "txt", texts))],
        base / "ds",
        tokenizer=tok,
        val_fraction=0.25,
        shard_docs=9,
        workers=1,
        progress=False,
    )
    return base / "ds"


@pytest.fixture(scope="module")
def char_datasets(tmp_path_factory):
    """Two datasets over disjoint letters (a-m, n-z), one shared char tokenizer, no eos."""
    base = tmp_path_factory.mktemp("char")
    tok = CharTokenizer([chr(c) for c in range(ord("a"), ord("z") + 1)])
    tok.save(base / "tok")
    rng = random.Random(1)
    out = []
    for name, letters in (("am", "abcdefghijklm"), ("nz", "nopqrstuvwxyz")):
        texts = ["".join(rng.choice(letters) for _ in range(rng.randint(5, 90))) for _ in range(40)]
        prepare_dataset(
            [str(write_docs(base / name, texts))],
            base / f"ds_{name}",
            tokenizer=base / "tok",
            val_fraction=0.0,
            workers=1,
            progress=False,
        )
        out.append(base / f"ds_{name}")
    return out


def documents(dataset, split="train", **kw):
    return [decode_record(r) for r in host_documents(dataset, split, **kw)]


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in BATCH_KEYS)


def check_rows_against_documents(rows_by_batch, docs, seq_len):
    """Segments, in stream order, must be consecutive slices of `docs` in order."""
    doc_index, offset = 0, 0
    for batch in rows_by_batch:
        for row in range(batch["inputs"].shape[0]):
            seg = batch["segment_ids"][row]
            np.testing.assert_array_equal(batch["loss_mask"][row], (seg > 0).astype(np.float32))
            ids = np.unique(seg[seg > 0])
            np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))
                np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
                doc = docs[doc_index]
                n = len(where)
                np.testing.assert_array_equal(batch["inputs"][row, where], doc[:-1][offset : offset + n])
                np.testing.assert_array_equal(batch["targets"][row, where], doc[1:][offset : offset + n])
                offset += n
                if offset == len(doc) - 1:
                    doc_index, offset = doc_index + 1, 0
                else:  # a document continues only where a row ends
                    assert where[-1] == seq_len - 1
                if doc_index == len(docs):
                    return
    raise AssertionError(f"stream ended after {doc_index} of {len(docs)} documents")


def test_batch_contract_and_exact_packing(sp_dataset):
    seq_len, batch = 32, 4
    docs = documents(sp_dataset, seed=3, repeat=False)
    total = sum(len(d) - 1 for d in docs)
    assert max(len(d) for d in docs) > 2 * seq_len  # some documents span several rows
    it = make_packed_train_iterator(
        [sp_dataset], seq_len=seq_len, global_batch_size=batch, seed=3, shuffle_window_rows=0
    )
    batches = take(it, total // (seq_len * batch) + 2)
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert b[key].shape == (batch, seq_len)
            assert b[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
        assert packing_efficiency(b) == 1.0  # an endless stream packs without padding
    check_rows_against_documents(batches, docs, seq_len)
    it.close()


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_hosts_read_disjoint_parts_that_cover_everything(sp_dataset, hosts):
    all_records = {r.tobytes() for r in documents(sp_dataset, seed=None, repeat=False)}
    n = len(all_records)
    seen = []
    for p in range(hosts):
        endless = host_documents(sp_dataset, "train", seed=7, process_index=p, process_count=hosts)
        first_epoch = [decode_record(endless[i]).tobytes() for i in range(len(range(p, n, hosts)))]
        seen += first_epoch
    assert len(seen) == len(set(seen)) == n
    assert set(seen) == all_records
    it = make_packed_train_iterator(
        [sp_dataset], seq_len=16, global_batch_size=8, seed=7, process_index=hosts - 1, process_count=hosts
    )
    assert next(it)["inputs"].shape == (8 // hosts, 16)
    it.close()


def test_epochs_are_reshuffled(sp_dataset):
    endless = host_documents(sp_dataset, "train", seed=1)
    n = len(documents(sp_dataset, seed=None, repeat=False))
    first = [decode_record(endless[i]).tobytes() for i in range(n)]
    second = [decode_record(endless[n + i]).tobytes() for i in range(n)]
    assert set(first) == set(second) and first != second


def dataset_of_rows(rows):
    """Which dataset (0: letters a-m, 1: n-z) each packed row came from."""
    return [int(r.min() >= 13) for b in rows for r in b["inputs"]]


@pytest.mark.parametrize("weights, share", [((0.7, 0.3), 0.7), ((1, 3), 0.25)])
def test_mixture_proportions(char_datasets, weights, share):
    # Rows are mixed by a deterministic interleaving, then shuffled within windows of 64
    # rows: over whole windows (7 x 64 rows here) the shares are exact to a row.
    it = make_packed_train_iterator(
        char_datasets, list(weights), seq_len=16, global_batch_size=8, seed=0, shuffle_window_rows=64
    )
    origin = dataset_of_rows(take(it, 56))
    it.close()
    realized = 1 - np.mean(origin)
    assert abs(realized - share) <= 1 / 448, realized


def test_restore_mid_epoch_is_exact(char_datasets, sp_dataset):
    kw = dict(seq_len=24, global_batch_size=4, seed=11, shuffle_window_rows=8)
    for dirs, weights in ((char_datasets, [0.6, 0.4]), ([sp_dataset], None)):
        it = make_packed_train_iterator(dirs, weights, **kw)
        states, batches = {}, []
        for step in range(16):
            if step in (1, 5, 10):
                # as grain.checkpoint stores it
                states[step] = json.loads(json.dumps(it.get_state()))
            batches.append(next(it))
        it.close()
        assert all(len(json.dumps(state)) < 2000 for state in states.values())
        for step, state in states.items():
            restored = make_packed_train_iterator(dirs, weights, **kw)
            restored.set_state(state)
            assert same_batches(take(restored, 6), batches[step : step + 6]), step
            restored.close()


def test_restore_when_rows_end_exactly_at_document_ends(tmp_path, char_datasets):
    # Documents of seq_len + 1 characters fill one row each, so every saved state has an
    # empty remainder: the case grain's packing gets wrong once JSON made tuples lists.
    seq_len = 8
    rng = random.Random(5)
    texts = ["".join(rng.choice("abcdefgh") for _ in range(seq_len + 1)) for _ in range(30)]
    tok_dir = char_datasets[0] / "tokenizer"
    prepare_dataset(
        [str(write_docs(tmp_path / "txt", texts))],
        tmp_path / "ds",
        tokenizer=tok_dir,
        val_fraction=0.0,
        workers=1,
        progress=False,
    )
    kw = dict(seq_len=seq_len, global_batch_size=2, seed=0, shuffle_window_rows=0)
    it = make_packed_train_iterator([tmp_path / "ds"], **kw)
    states, batches = [], []
    for _ in range(8):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    it.close()
    for k in range(8):
        restored = make_packed_train_iterator([tmp_path / "ds"], **kw)
        restored.set_state(states[k])
        assert same_batches(take(restored, 8 - k), batches[k:]), k
        restored.close()


def test_worker_processes_give_the_same_batches(sp_dataset):
    kw = dict(seq_len=16, global_batch_size=4, seed=2)
    threads = make_packed_train_iterator([sp_dataset], **kw)
    expected = take(threads, 6)
    threads.close()
    # One worker process reads the whole host part, so it must give the same batches,
    # and restore exactly from its own (JSON-saved) state.
    workers = make_packed_train_iterator([sp_dataset], worker_processes=1, **kw)
    assert same_batches(take(workers, 2), expected[:2])
    state = json.loads(json.dumps(workers.get_state()))
    assert same_batches(take(workers, 4), expected[2:])
    workers.set_state(state)
    assert same_batches(take(workers, 4), expected[2:])
    workers.close()


def test_tokenizer_hash_must_match(sp_dataset, char_datasets):
    fingerprint = load_dataset_metadata(sp_dataset)["tokenizer"]["fingerprint"]
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        make_packed_train_iterator([sp_dataset], seq_len=8, global_batch_size=2, seed=0, tokenizer_fingerprint=wrong)
    assert fingerprint in str(err.value) and wrong in str(err.value)
    with pytest.raises(ValueError, match="a mixture needs one tokenizer"):
        make_packed_train_iterator([sp_dataset, char_datasets[0]], seq_len=8, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        make_packed_train_iterator([sp_dataset], seq_len=8, global_batch_size=4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="weights: 1 given for 2 datasets"):
        make_packed_train_iterator(char_datasets, [1.0], seq_len=8, global_batch_size=2, seed=0)


def test_eval_batches(sp_dataset):
    seq_len, gbs = 16, 4
    val_docs = documents(sp_dataset, "val", seed=None, repeat=False)
    total = sum(len(d) - 1 for d in val_docs)
    rows_needed = -(-total // seq_len)
    one = make_packed_eval_batches([sp_dataset], seq_len=seq_len, global_batch_size=gbs, num_batches=1000)
    # Padding only in the last batch; all of the validation split is there, in order.
    assert len(one) == -(-rows_needed // gbs)
    assert all(packing_efficiency(b) == 1.0 for b in one[:-2])
    assert one[-1]["loss_mask"].sum() + sum(b["loss_mask"].sum() for b in one[:-1]) == total
    check_rows_against_documents(one, val_docs, seq_len)
    again = make_packed_eval_batches([sp_dataset], seq_len=seq_len, global_batch_size=gbs, num_batches=1000)
    assert same_batches(one, again)
    # Two hosts: each holds every other row of the same global batches.
    few = make_packed_eval_batches([sp_dataset], seq_len=seq_len, global_batch_size=gbs, num_batches=2)
    assert same_batches(few, one[:2])
    parts = [
        make_packed_eval_batches(
            [sp_dataset], seq_len=seq_len, global_batch_size=gbs, num_batches=2, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    for k in range(2):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(parts[0][k][key], one[k][key][0::2])
            np.testing.assert_array_equal(parts[1][k][key], one[k][key][1::2])


def test_metadata_errors(tmp_path, sp_dataset, char_datasets):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_dataset_metadata(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    shutil.copytree(sp_dataset, copy)
    meta = load_dataset_metadata(copy)
    shard = copy / meta["splits"]["train"]["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="the shard changed after it was prepared"):
        load_dataset_metadata(copy)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard train/shard-00001.array_record"):
        load_dataset_metadata(copy)
    (copy / "metadata.json").write_text('{"format": "flaxpod-prepared-dataset", "vers')
    with pytest.raises(ValueError, match="corrupt metadata"):
        load_dataset_metadata(copy)
    with pytest.raises(ValueError, match="no validation documents"):
        make_packed_eval_batches([char_datasets[0]], seq_len=8, global_batch_size=2, num_batches=1)
