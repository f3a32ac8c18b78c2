"""Classification data: reading CSV/TSV/JSONL, labels, bad input, encoding and Grain batches."""

import json
from pathlib import Path

import numpy as np
import pytest
from flaxpod.data.classify import (
    EncodedExamples,
    Example,
    class_weights,
    collect_labels,
    encode_examples,
    encode_texts,
    load_labels,
    make_classify_eval_batches,
    make_classify_train_iterator,
    read_examples,
    save_labels,
    sort_labels,
)
from flaxpod.data.tokenizer import CharTokenizer, train_sentencepiece
from flaxpod.model.errors import InputError

BATCH_KEYS = ["inputs", "segment_ids", "positions", "labels", "index"]


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def char_tok():
    return CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ,.'\"\n")))


# ---------------------------------------------------------------- reading


def test_csv_with_a_quoted_multiline_field(tmp_path):
    path = write(
        tmp_path / "train.csv",
        "text,category\n"
        "hello there,greet\n"
        '"two\nlines, a comma and ""quotes""",other\n'
        "\n"  # a blank line is skipped
        '"\nleading newline\n\n",greet\n',
    )
    examples = read_examples(path, "text", "category")
    assert examples == [
        Example("hello there", "greet", row=1, line=2),
        Example('two\nlines, a comma and "quotes"', "other", row=2, line=3),
        Example("\nleading newline\n\n", "greet", row=3, line=6),
    ]


def test_csv_with_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes('\ufefftext,label\r\nyes please,a\r\n"multi\r\nline",b\r\n'.encode())
    examples = read_examples(path)
    assert [(e.text, e.label, e.line) for e in examples] == [("yes please", "a", 2), ("multi\r\nline", "b", 3)]


def test_tsv_keeps_quotes_and_ignores_other_columns(tmp_path):
    path = write(tmp_path / "dev.tsv", 'id\tsentence\tlabel\n7\tsaid "hi", then left\tpos\n8\t"quoted\tneg\n')
    examples = read_examples(path, text_field="sentence")
    assert examples == [Example('said "hi", then left', "pos", 1, 2), Example('"quoted', "neg", 2, 3)]


def test_jsonl_with_integer_labels_and_custom_fields(tmp_path):
    path = write(
        tmp_path / "train.jsonl",
        '{"q": "first", "y": 1}\n\n{"q": "sec\\u00f6nd\u2028same line", "y": "0", "extra": [1]}\n',
    )
    examples = read_examples(path, text_field="q", label_field="y")
    assert examples == [Example("first", "1", 1, 1), Example("secönd\u2028same line", "0", 2, 3)]
    assert [e.label for e in read_examples(path, "q", None)] == [None, None]
    bom = write(tmp_path / "bom.jsonl", '\ufeff{"q": "first", "y": 1}\n')  # as some Windows editors save it
    assert read_examples(bom, "q", "y") == [Example("first", "1", 1, 1)]


def test_labels_sorted_by_string_or_number_and_saved(tmp_path):
    def examples(labels):
        return [Example("t", label, i + 1, i + 2) for i, label in enumerate(labels)]

    assert collect_labels(examples(["b", "a", "B", "a"]), "f") == ["B", "a", "b"]
    assert collect_labels(examples(["a", "b", "B"]), "f") == collect_labels(examples(["B", "b", "a"]), "f")
    assert collect_labels(examples(["10", "2", "1", "2"]), "f") == ["1", "2", "10"]
    assert sort_labels(["10", "2", "x"]) == ["10", "2", "x"]  # not all integers: as strings
    assert sort_labels(["-1", "007", "3"]) == ["-1", "007", "3"]  # "007" is not a plain integer

    path = tmp_path / "run" / "labels.json"
    save_labels(path, ["négatif", "positive"])
    assert json.loads(path.read_text(encoding="utf-8")) == {"labels": ["négatif", "positive"]}
    assert load_labels(path) == ["négatif", "positive"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["labels.json"]  # no temporary left behind

    write(path, '{"labels": ["a", "a"]}')
    with pytest.raises(InputError, match="label 'a' appears twice"):
        load_labels(path)
    write(path, "[1, 2")
    with pytest.raises(InputError, match="not a labels file"):
        load_labels(path)
    with pytest.raises(InputError, match="no such file"):
        load_labels(tmp_path / "missing.json")
    with pytest.raises(InputError, match="at least 2"):
        save_labels(path, ["only"])


def test_unseen_label_names_file_and_row(tmp_path, char_tok):
    train = read_examples(write(tmp_path / "train.csv", "text,label\na,x\nb,y\n"))
    val_path = write(tmp_path / "val.csv", 'text,label\nc,x\n"d\ne",z\n')
    labels = collect_labels(train, tmp_path / "train.csv")
    with pytest.raises(InputError) as e:
        encode_examples(read_examples(val_path), char_tok, labels, 8, val_path)
    assert str(e.value) == f"{val_path} row 2 (line 3): label 'z' is not among the 2 labels of the training file"


BAD_INPUTS = [
    ("a.csv", "text,label\nhi,x\n", {"text_field": "sentence"}, r"line 1: no text column 'sentence' \(the header"),
    ("a.csv", "text,label\nhi,x\n", {"label_field": "category"}, r"line 1: no label column 'category'"),
    ("a.jsonl", '{"text": "hi", "label": "x"}\n{"text": "yo"}\n', {}, r"row 2 \(line 2\): no label field 'label'"),
    ("a.csv", "", {}, r": empty file \(no header row\)"),
    ("a.csv", "text,label\n", {}, r": no examples"),
    ("a.jsonl", "\n\n", {}, r"a.jsonl: empty file: no JSON lines"),
    ("a.csv", "text,label\nhi,x\nthere,y,extra\n", {}, r"row 2 \(line 3\): 3 fields, the header has 2"),
    ("a.tsv", "text\tlabel\nhi\n", {}, r"row 1 \(line 2\): 1 fields, the header has 2"),
    ("a.csv", 'text,label\n"hi" there,x\n', {}, r"line 2: bad CSV"),
    ("a.csv", "text,label\nhi,x\n  ,y\n", {}, r"row 2 \(line 3\): empty text in column 'text'"),
    ("a.csv", "text,label\nhi,\n", {}, r"row 1 \(line 2\): empty label in column 'label'"),
    ("a.jsonl", '{"text": "hi", "label": "x"}\n{"text": "hi", "label": }\n', {}, r"a.jsonl:2: invalid JSON"),
    ("a.jsonl", '{"text": 5, "label": "x"}\n', {}, r"row 1 \(line 1\): field 'text' is a number, expected a string"),
    ("a.jsonl", '{"text": null, "label": "x"}\n', {}, r"field 'text' is null, expected a string"),
    ("a.jsonl", '{"text": "a", "label": true}\n', {}, r"field 'label' is a boolean, expected a string or an integer"),
    ("a.jsonl", '["text", "label"]\n', {}, r"a.jsonl:1: expected a JSON object, got an array"),
    ("a.txt", "text,label\n", {}, r"unknown extension '.txt'"),
]


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_naming_file_and_row(tmp_path, name, content, kwargs, message):
    path = write(tmp_path / name, content)
    with pytest.raises(InputError, match=message) as e:
        read_examples(path, **kwargs)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_more_bad_files(tmp_path):
    with pytest.raises(InputError, match=r"missing.csv: no such file"):
        read_examples(tmp_path / "missing.csv")
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,label\ncaf\xe9,x\n")
    with pytest.raises(InputError, match=r"latin1.csv line 2: not UTF-8 text \(byte offset 14: b'\\xe9'\)$"):
        read_examples(path)
    one_class = tmp_path / "train.csv"
    write(one_class, "text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(InputError, match=r"train.csv: every one of the 3 examples has the label 'x'; .* at least 2"):
        collect_labels(read_examples(one_class), one_class)


# ---------------------------------------------------------------- encoding


def test_truncation_keeps_the_start_and_is_counted(tmp_path, char_tok):
    examples = [Example("abcdefgh", "x", 1, 2), Example("ab", "y", 2, 3), Example("abcd", "x", 3, 4)]
    encoded = encode_examples(examples, char_tok, ["x", "y"], 4, "f.csv")
    assert [encoded.tokens(i).tolist() for i in range(3)] == [
        char_tok.encode("abcd"),
        char_tok.encode("ab"),
        char_tok.encode("abcd"),
    ]
    assert encoded.label_ids.tolist() == [0, 1, 0]
    assert encoded.stats() == {"examples": 3, "truncated": 1, "max_tokens": 8, "mean_tokens": 10 / 3}


def test_append_eos_stays_last_after_truncation():
    tok = train_sentencepiece(["the king said to the queen, good night. " * 50], 320)
    encoded = encode_texts(["the king said to the queen", "night"], tok, 4, append_eos=True)
    full = tok.encode("the king said to the queen")
    assert len(full) > 3
    assert encoded.tokens(0).tolist() == full[:3] + [tok.eos_id]
    assert encoded.tokens(1).tolist() == tok.encode("night") + [tok.eos_id]
    assert encoded.truncated == 1 and encoded.max_tokens == len(full) + 1
    assert encoded.label_ids.tolist() == [-1, -1]
    with pytest.raises(InputError, match="char tokenizer has no EOS"):
        encode_texts(["abc"], CharTokenizer(list("abc")), 4, append_eos=True)


def test_text_the_tokenizer_cannot_encode_names_the_row(tmp_path):
    path = write(tmp_path / "val.csv", "text,label\nab,x\nabz,y\n")
    with pytest.raises(InputError, match=r"val.csv row 2 \(line 3\): the tokenizer cannot encode the text: .*'z'"):
        encode_examples(read_examples(path), CharTokenizer(list("ab")), ["x", "y"], 8, path)


# ---------------------------------------------------------------- batches


def _encoded(n: int, seq_len: int = 6, n_classes: int = 3) -> EncodedExamples:
    """Example i: i % 5 + 1 tokens of value i + 1 (so rows identify their example); label i % n_classes."""
    alphabet = [chr(ord("A") + i) for i in range(26)] + [chr(ord("a") + i) for i in range(26)]
    tok = CharTokenizer(sorted(alphabet[:n]))
    examples = [Example(tok.chars[i] * (i % 5 + 1), str(i % n_classes), i + 1, i + 2) for i in range(n)]
    return encode_examples(examples, tok, [str(c) for c in range(n_classes)], seq_len, "f.csv")


def test_eval_batch_layout_exactly(char_tok):
    examples = [Example("ab", "y", 1, 2), Example("c", "x", 2, 3), Example("abcdef", "y", 3, 4)]
    encoded = encode_examples(examples, char_tok, ["x", "y"], 4, "f.csv")
    a, b, c, d = char_tok.encode("abcd")
    batches = make_classify_eval_batches(encoded, global_batch_size=2)
    assert len(batches) == 2
    first, last = batches
    assert sorted(first) == sorted(BATCH_KEYS)
    assert all(v.dtype == np.int32 for v in first.values())
    np.testing.assert_array_equal(first["inputs"], [[a, b, 0, 0], [c, 0, 0, 0]])
    np.testing.assert_array_equal(first["segment_ids"], [[1, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(first["positions"], [[0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(first["labels"], [1, 0])
    np.testing.assert_array_equal(first["index"], [0, 1])
    # The last global batch: the truncated example and one padding row.
    np.testing.assert_array_equal(last["inputs"], [[a, b, c, d], [0, 0, 0, 0]])
    np.testing.assert_array_equal(last["segment_ids"], [[1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(last["positions"], [[0, 1, 2, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(last["labels"], [1, -1])
    np.testing.assert_array_equal(last["index"], [2, -1])
    # A sequence read as often as needed: indexing, negative indices, slices, iteration again.
    np.testing.assert_array_equal(batches[-1]["inputs"], last["inputs"])
    assert [b["index"].tolist() for b in batches[0:2]] == [[0, 1], [2, -1]]
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, -1]]


@pytest.mark.parametrize(("n", "global_batch", "processes"), [(10, 4, 1), (10, 4, 2), (7, 8, 4), (8, 4, 2)])
def test_eval_batches_score_every_example_once(n, global_batch, processes):
    encoded = _encoded(n)
    per_process = [
        make_classify_eval_batches(encoded, global_batch_size=global_batch, process_index=p, process_count=processes)
        for p in range(processes)
    ]
    assert len({len(b) for b in per_process}) == 1  # same batch count on every process
    assert len(per_process[0]) == -(-n // global_batch)
    rows = {k: np.concatenate([b[k] for batches in per_process for b in batches]) for k in BATCH_KEYS}
    real = rows["index"] >= 0
    assert sorted(rows["index"][real].tolist()) == list(range(n))
    assert (rows["labels"][real] == encoded.label_ids[rows["index"][real]]).all()
    pad = ~real
    assert (rows["labels"][pad] == -1).all() and not rows["segment_ids"][pad].any() and not rows["inputs"][pad].any()
    assert pad.sum() == len(per_process[0]) * global_batch - n


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_train_iterator_shuffles_each_epoch_and_repeats():
    encoded = _encoded(12)
    it = make_classify_train_iterator(encoded, global_batch_size=4, seed=3)
    batches = _take(it, 9)  # three epochs of three batches
    epochs = [np.concatenate([b["index"] for b in batches[e * 3 : e * 3 + 3]]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(12))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(12))
    for b in batches:  # each row is its example
        for row, i in enumerate(b["index"]):
            length = i % 5 + 1
            assert (b["inputs"][row, :length] == encoded.tokens(i)).all() and not b["inputs"][row, length:].any()
            assert b["segment_ids"][row].sum() == length and b["labels"][row] == i % 3
    other_seed = make_classify_train_iterator(encoded, global_batch_size=4, seed=4)
    assert not np.array_equal(next(other_seed)["index"], batches[0]["index"])


def test_train_iterator_state_restores_exactly_through_json():
    encoded = _encoded(10)
    it = make_classify_train_iterator(encoded, global_batch_size=4, seed=0)
    _take(it, 3)  # into the second epoch
    state = json.dumps(it.get_state())
    expected = _take(it, 5)
    resumed = make_classify_train_iterator(encoded, global_batch_size=4, seed=0)
    resumed.set_state(json.loads(state))
    for want, got in zip(expected, _take(resumed, 5), strict=True):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(want[k], got[k])


def test_two_processes_are_disjoint_and_together_one_process():
    encoded = _encoded(10)
    single = _take(make_classify_train_iterator(encoded, global_batch_size=4, seed=5), 6)
    halves = [
        _take(make_classify_train_iterator(encoded, global_batch_size=4, seed=5, process_index=p, process_count=2), 6)
        for p in range(2)
    ]
    for step, whole in enumerate(single):
        parts = [halves[p][step] for p in range(2)]
        assert all(len(part["index"]) == 2 for part in parts)
        union = {k: np.concatenate([part[k] for part in parts]) for k in BATCH_KEYS}
        # Same rows as the one-process batch, each once (a row is identified by its example).
        order, whole_order = np.argsort(union["index"]), np.argsort(whole["index"])
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(union[k][order], whole[k][whole_order])
    # Disjoint: within an epoch, no example is in both processes' rows. Steps 0-1 are wholly
    # in epoch 1 (stream positions 0-7) and steps 3-4 in epoch 2 (positions 12-19).
    for epoch_steps in (range(0, 2), range(3, 5)):
        seen = [set(np.concatenate([halves[p][s]["index"] for s in epoch_steps]).tolist()) for p in range(2)]
        assert not seen[0] & seen[1]


def test_class_weights_are_balanced_inverse_frequency():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 0, 1, 3])  # counts 5, 2, 2, 1
    # scikit-learn's compute_class_weight("balanced"): n_samples / (n_classes * count), by hand.
    np.testing.assert_allclose(class_weights(labels, 4), [10 / 20, 10 / 8, 10 / 8, 10 / 4], rtol=1e-7)
    assert class_weights(labels, 4).dtype == np.float32
    assert np.mean(class_weights(labels, 4)[labels]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class 4 has no training examples"):
        class_weights(labels, 5)
