"""Text corpora and the Grain token pipeline: paths, decoding, splits, windows, batches."""

import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flaxpod.data.pipeline import (
    WindowSource,
    make_eval_batches,
    make_train_iterator,
    split_tokens,
    tokenize_corpus,
)
from flaxpod.data.text import (
    DEFAULT_CORPUS,
    Corpus,
    default_corpus_paths,
    read_corpus,
    resolve_text_paths,
)
from flaxpod.data.tokenizer import CharTokenizer, train_char_tokenizer

# ---------------------------------------------------------------- text files


@pytest.fixture
def tree(tmp_path):
    for rel, text in {
        "b.txt": "bee",
        "a.txt": "ay",
        "sub/c.txt": "sea",
        "sub/deeper/d.md": "dee",
        ".hidden.txt": "no",
        ".git/config": "no",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_resolve_file_dir_glob_and_several(tree):
    assert resolve_text_paths(str(tree / "a.txt")) == [tree / "a.txt"]
    assert resolve_text_paths(str(tree)) == [
        tree / "a.txt",
        tree / "b.txt",
        tree / "sub/c.txt",
        tree / "sub/deeper/d.md",
    ]
    assert resolve_text_paths(str(tree / "*.txt")) == [tree / "a.txt", tree / "b.txt"]
    assert resolve_text_paths(str(tree / "**/*.txt")) == [
        tree / "a.txt",
        tree / "b.txt",
        tree / "sub/c.txt",
    ]
    # Several specs keep their order; a file named twice appears once.
    specs = [str(tree / "sub"), str(tree / "*.txt"), str(tree / "sub/c.txt")]
    assert resolve_text_paths(specs) == [
        tree / "sub/c.txt",
        tree / "sub/deeper/d.md",
        tree / "a.txt",
        tree / "b.txt",
    ]


def test_resolve_missing_is_one_line_naming_the_spec(tree):
    for spec in [str(tree / "nope.txt"), str(tree / "*.csv"), str(tree / "sub/deeper/*.txt")]:
        with pytest.raises(FileNotFoundError, match=r"^data.path: no files match '.*'$") as e:
            resolve_text_paths(spec)
        assert spec in str(e.value)
    (tree / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no files match"):
        resolve_text_paths([str(tree / "a.txt"), str(tree / "empty_dir")])


def test_read_corpus_counts_replaced_bytes_and_normalizes_crlf(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    (tmp_path / "fffd.txt").write_text("already \ufffd here", encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    paths = resolve_text_paths(str(tmp_path))
    corpus = read_corpus(paths)
    assert corpus.paths == [tmp_path / "crlf.txt", tmp_path / "fffd.txt", tmp_path / "latin1.txt"]
    assert corpus.documents == ["one\ntwo\n", "already \ufffd here", "caf\ufffd"]
    assert corpus.replaced_bytes == 1  # the file's own U+FFFD is not counted
    assert corpus.total_bytes == 4 + 10 + len("already \ufffd here".encode()) + 0
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x80ok")  # three bad bytes in a row
    assert read_corpus([tmp_path / "bad.txt"]).replaced_bytes == 3


def test_read_corpus_all_empty_is_an_error(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"corpus '.*' is empty \(2 files, 0 bytes\)"):
        read_corpus(resolve_text_paths(str(tmp_path)))


def test_default_corpus_is_the_stdlib_and_large_enough():
    paths = default_corpus_paths()
    assert paths == resolve_text_paths(DEFAULT_CORPUS) == default_corpus_paths()
    assert all(p.suffix == ".py" and p.is_file() for p in paths)
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"test", "tests", "site-packages", "idlelib", "lib2to3"}
    assert not any(excluded & set(p.relative_to(root).parts) for p in paths)
    sizes = [p.stat().st_size for p in paths]
    assert 1_000_000 <= sum(sizes) <= 4_000_000
    assert sum(p.stat().st_size for p in default_corpus_paths(max_bytes=100_000)) <= 100_000


# ---------------------------------------------------------------- tokens and splits


def test_tokenize_corpus_concatenates_with_eos_when_there_is_one():
    corpus = Corpus(documents=["ab", "ba"], paths=[], replaced_bytes=0, total_bytes=4)
    tok = train_char_tokenizer("ab")
    tokens = tokenize_corpus(corpus, tok)
    assert tokens.dtype == np.int32 and tokens.tolist() == [0, 1, 1, 0]

    class CharWithEos(CharTokenizer):
        eos_id = 2

    tokens = tokenize_corpus(corpus, CharWithEos(["a", "b"]))
    assert tokens.tolist() == [0, 1, 2, 1, 0, 2]


def test_split_sizes_and_content():
    tokens = np.arange(1000, dtype=np.int32)
    train, val = split_tokens(tokens, 0.1)
    assert (len(train), len(val)) == (900, 100)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))
    train, val = split_tokens(tokens, 0.0)
    assert len(train) == 1000 and len(val) == 0
    with pytest.raises(ValueError, match="data.val_fraction"):
        split_tokens(tokens, 1.0)


def test_split_too_small_names_path_tokens_and_seq_len():
    tokens = np.arange(300, dtype=np.int32)
    assert len(split_tokens(tokens, 0.1, seq_len=29)[1]) == 30  # exactly one window
    with pytest.raises(
        ValueError,
        match=r"data.path: 'tiny.txt' gives 300 tokens; its "
        r"validation part .* seq_len \+ 1 = 31",
    ):
        split_tokens(tokens, 0.1, seq_len=30, data_path="tiny.txt")
    with pytest.raises(ValueError, match="its train part"):
        split_tokens(tokens, 0.1, seq_len=500, data_path="tiny.txt")


def test_window_source_items_are_token_slices():
    tokens = np.arange(100, 150, dtype=np.int32)
    for seq_len, stride, expected_len in [(8, 8, 6), (8, 1, 42), (9, 10, 5), (49, 1, 1)]:
        src = WindowSource(tokens, seq_len, stride)
        assert len(src) == expected_len
        for i in range(len(src)):
            assert src[i].tolist() == tokens[i * stride : i * stride + seq_len + 1].tolist()
        assert np.array_equal(src.gather([2 % len(src), 0]), np.stack([src[2 % len(src)], src[0]]))
        with pytest.raises(IndexError):
            src[len(src)]
    with pytest.raises(ValueError, match="50 tokens cannot fill one window of seq_len"):
        WindowSource(tokens, 50, 1)


# ---------------------------------------------------------------- training iterator

SEQ = 4


def rows(batch) -> list[int]:
    """Window identities: with tokens = arange, a row's first token is its start offset."""
    assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["inputs"].shape == batch["targets"].shape == (len(batch["inputs"]), SEQ)
    assert np.array_equal(batch["targets"], batch["inputs"] + 1)
    assert np.array_equal(batch["inputs"], batch["inputs"][:, :1] + np.arange(SEQ))
    return batch["inputs"][:, 0].tolist()


def take(it, n):
    return [rows(next(it)) for _ in range(n)]


def test_epochs_cover_every_window_once_and_reshuffle():
    tokens = np.arange(16 * SEQ + 1, dtype=np.int32)  # 16 non-overlapping windows
    it = make_train_iterator(tokens, seq_len=SEQ, global_batch_size=4, seed=0, stride=SEQ)
    epoch1, epoch2 = sum(take(it, 4), []), sum(take(it, 4), [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(0, 16 * SEQ, SEQ))
    assert epoch1 != epoch2
    other_seed = make_train_iterator(tokens, seq_len=SEQ, global_batch_size=4, seed=1, stride=SEQ)
    assert sum(take(other_seed, 4), []) != epoch1


def test_stride_one_samples_every_offset_without_replacement():
    tokens = np.arange(40, dtype=np.int32)  # 36 windows of SEQ + 1 = 5 tokens
    it = make_train_iterator(tokens, seq_len=SEQ, global_batch_size=6, seed=3, stride=1)
    assert sorted(sum(take(it, 6), [])) == list(range(36))


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_each_global_batch_disjointly(process_count):
    tokens = np.arange(40 * SEQ + 1, dtype=np.int32)  # 40 windows; 8 steps cross an epoch
    kw = dict(seq_len=SEQ, global_batch_size=8, seed=5, stride=SEQ)
    single = take(make_train_iterator(tokens, **kw), 8)
    per_process = [
        take(make_train_iterator(tokens, process_index=p, process_count=process_count, **kw), 8)
        for p in range(process_count)
    ]
    for step in range(8):
        parts = [per_process[p][step] for p in range(process_count)]
        assert all(len(part) == 8 // process_count for part in parts)
        assert Counter(sum(parts, [])) == Counter(single[step])


def test_state_restores_exactly_mid_epoch_and_across_epochs():
    tokens = np.arange(10 * SEQ + 1, dtype=np.int32)  # 10 windows, batch 4: epochs mix
    kw = dict(seq_len=SEQ, global_batch_size=4, seed=11, stride=SEQ, prefetch_threads=2)
    reference = take(make_train_iterator(tokens, **kw), 12)
    for consumed in (1, 2, 3, 7):  # mid-epoch, at and after epoch boundaries
        it = make_train_iterator(tokens, **kw)
        take(it, consumed)
        state = it.get_state()
        take(it, 2)  # the state is a snapshot, not a live view
        fresh = make_train_iterator(tokens, **kw)
        fresh.set_state(state)
        assert take(fresh, 12 - consumed) == reference[consumed:]


def test_train_iterator_rejects_bad_process_split():
    tokens = np.arange(100, dtype=np.int32)
    with pytest.raises(ValueError, match="global_batch_size: 6 is not divisible by the 4"):
        make_train_iterator(tokens, seq_len=SEQ, global_batch_size=6, seed=0, stride=1, process_count=4)


# ---------------------------------------------------------------- evaluation batches


def test_eval_batches_are_fixed_spread_and_split_across_processes():
    tokens = np.arange(100 * SEQ + 1, dtype=np.int32)  # 100 windows
    kw = dict(seq_len=SEQ, global_batch_size=4, num_batches=2)
    batches = make_eval_batches(tokens, **kw)
    again = make_eval_batches(tokens, **kw)
    assert [rows(b) for b in batches] == [rows(b) for b in again]
    # 8 rows spread evenly over 100 windows: windows 0, 12, 25, 37, 50, 62, 75, 87.
    assert [rows(b) for b in batches] == [[0, 48, 100, 148], [200, 248, 300, 348]]
    for process_count in (2, 4):
        parts = [
            make_eval_batches(tokens, process_index=p, process_count=process_count, **kw) for p in range(process_count)
        ]
        for k in range(2):
            assert Counter(sum((rows(parts[p][k]) for p in range(process_count)), [])) == Counter(rows(batches[k]))


def test_eval_batches_wrap_around_few_windows():
    tokens = np.arange(3 * SEQ + 1, dtype=np.int32)  # 3 windows, 8 rows wanted
    batches = make_eval_batches(tokens, seq_len=SEQ, global_batch_size=4, num_batches=2)
    assert [rows(b) for b in batches] == [[0, 4, 8, 0], [4, 8, 0, 4]]
