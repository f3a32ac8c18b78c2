"""SFT data: reading and rendering, response-only loss masks, truncation, whole-example packing,
exact iterator restore, process sharding, answer extraction and bad input."""

from __future__ import annotations

import json
import random

import grain
import numpy as np
import pytest
from flaxpod.data.sft import (
    encode_prompt,
    make_sft_eval_batches,
    make_sft_train_iterator,
    require_eos,
    tokenize_examples,
)
from flaxpod.data.sft_answers import check_extractor, check_references, exact_match, extract_answer
from flaxpod.data.sft_format import Segment, SFTFormat, load_sft_eval_pairs, load_sft_examples
from flaxpod.data.sft_packing import BATCH_KEYS, TokenizedExample, first_fit_rows, packing_efficiency
from flaxpod.data.tokenizer import Tokenizer, train_char_tokenizer, train_sentencepiece
from flaxpod.model.errors import ConfigError, InputError
from grain.experimental import FirstFitPackIterDataset

EOS = 3


class ByteTokenizer(Tokenizer):
    """Ids that can be checked by hand: byte b is id b + 4; EOS is 3."""

    kind = "bytes"
    filename = "bytes.json"
    vocab_size = 260
    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return [b + 4 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 4 for i in ids if i >= 4).decode()

    def serialize(self) -> bytes:
        return b"bytes"


def ids(text: str) -> list[int]:
    return [b + 4 for b in text.encode()]


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        pad = " please" * rng.randint(0, 6)  # varied lengths
        out.append({"prompt": f"add {a} and {b}{pad}", "response": f"{a} + {b} = {a + b} #### {a + b}"})
    return out


@pytest.fixture(scope="module")
def sp_tok():
    text = "\n".join(json.dumps(r) for r in arithmetic_records(300, seed=9))
    return train_sentencepiece([text], vocab_size=340)


# ---------------------------------------------------------------------------------------------
# Rendering and token layout


def test_prompt_response_exact_layout(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "2+2", "a": "4"}])
    fmt = SFTFormat(prompt_field="q", response_field="a", prompt_template="Q:{prompt}\nA:")
    (example,) = load_sft_examples(path, fmt)
    assert example.segments == (Segment("Q:2+2\nA:", False), Segment("4", True))
    assert example.where == f"{path}:1"
    (tok,), stats = tokenize_examples([example], ByteTokenizer(), seq_len=16)
    # Q : 2 + 2 \n A : -> 85 62 54 47 54 14 69 62; "4" -> 56; then EOS.
    assert tok.tokens.tolist() == [85, 62, 54, 47, 54, 14, 69, 62, 56, EOS]
    assert tok.tokens.dtype == np.int32
    # Over targets tokens[1:]: only "4" and EOS carry the loss.
    assert tok.loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert tok.loss_mask.dtype == np.float32
    assert stats.as_dict() == {
        "examples": 1,
        "kept": 1,
        "truncated": 0,
        "dropped": 0,
        "tokens": 10,
        "loss_tokens": 2,
        "longest": 10,
    }


def test_default_prompt_template_and_instances_expansion(tmp_path):
    record = {
        "instruction": "Reverse the word.",
        "instances": [{"input": "abc", "output": "cba"}, {"input": "  ", "output": "?"}],
        "is_classification": False,
    }
    path = write_jsonl(
        tmp_path / "seed.jsonl", [record, {"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}]
    )
    fmt = SFTFormat(prompt_field="instruction", response_field="instances")
    examples = load_sft_examples(path, fmt)
    assert [e.segments for e in examples] == [
        (Segment("### Instruction:\nReverse the word.\n\nabc\n\n### Response:\n", False), Segment("cba", True)),
        (Segment("### Instruction:\nReverse the word.\n\n### Response:\n", False), Segment("?", True)),
        (Segment("### Instruction:\nSay hi.\n\n### Response:\n", False), Segment("hi", True)),
    ]
    assert [e.line for e in examples] == [1, 1, 2]
    pairs = load_sft_eval_pairs(path, fmt)
    assert [(p.prompt, p.reference) for p in pairs] == [(e.segments[0].text, e.segments[1].text) for e in examples]


def test_chat_rendering_and_loss_on_assistant_turns_only(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "ignored trailing turn"},
        ]
    }
    path = write_jsonl(tmp_path / "chat.jsonl", [chat])
    fmt = SFTFormat(system_template="[s]{content}|", user_template="[u]{content}|", assistant_template="[a]{content}|")
    (example,) = load_sft_examples(path, fmt)
    assert example.segments == (
        Segment("[s]S|[u]u1|[a]", False),
        Segment("a1", True),
        Segment("|[u]u2|[a]", False),
        Segment("a2", True),
    )
    (tok,), _ = tokenize_examples([example], ByteTokenizer(), seq_len=64)
    expected = ids("[s]S|[u]u1|[a]") + ids("a1") + [EOS] + ids("|[u]u2|[a]") + ids("a2") + [EOS]
    assert tok.tokens.tolist() == expected
    is_response = [0] * 14 + [1, 1, 1] + [0] * 10 + [1, 1, 1]
    assert tok.loss_mask.tolist() == is_response[1:]
    # Evaluation pair: the last reply is the reference; the prompt ids equal training's prefix.
    (pair,) = load_sft_eval_pairs(path, fmt)
    assert pair.prompt == "[s]S|[u]u1|[a]a1|[u]u2|[a]"
    assert pair.reference == "a2"
    assert encode_prompt(pair, ByteTokenizer()) == expected[:-3]


def test_default_chat_template(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    (example,) = load_sft_examples(path)
    assert example.segments == (Segment("<|user|>\nhi\n<|assistant|>\n", False), Segment("yo", True))


def test_sentencepiece_prompt_tokens_carry_no_loss(tmp_path, sp_tok):
    records = arithmetic_records(40)
    examples = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", records))
    tokenized, stats = tokenize_examples(examples, sp_tok, seq_len=512)
    assert stats.kept == 40 and stats.dropped == stats.truncated == 0
    for example, tok in zip(examples, tokenized, strict=True):
        prompt, response = (sp_tok.encode(s.text) for s in example.segments)
        assert tok.tokens.tolist() == prompt + response + [sp_tok.eos_id]
        assert tok.loss_mask.tolist() == [0.0] * (len(prompt) - 1) + [1.0] * (len(response) + 1)
        assert sp_tok.decode(tok.tokens[1:][tok.loss_mask > 0]) == example.segments[1].text
    assert stats.loss_tokens == sum(int(t.loss_mask.sum()) for t in tokenized)
    assert require_eos(sp_tok) == 3


def test_char_tokenizer_without_eos_is_refused(tmp_path):
    examples = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "response": "ba"}]))
    with pytest.raises(InputError, match="'char' tokenizer has no EOS") as e:
        tokenize_examples(examples, train_char_tokenizer("ab#:\n ABCDEFGHIJKLMNOPQRSTUVWXYZIinostr"), seq_len=8)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Truncation


def test_truncation_cuts_prompt_from_left_or_drops_and_counts(tmp_path):
    fmt = SFTFormat(prompt_template="{prompt}>")
    records = [
        {"prompt": "abc", "response": "xy"},  # 3 + 1 + 2 + EOS = 7 tokens: fits seq_len 6
        {"prompt": "abcdefgh", "response": "xy"},  # 12 tokens: prompt cut to its last 4 ("fgh>")
        {"prompt": "a", "response": "uvwxyz"},  # response + EOS + 1 token before = 8 > 7: dropped
        {"prompt": "", "response": "uvwxy"},  # ">uvwxy" + EOS = 7: fits exactly
        {"prompt": "abcdef", "response": "vwxyz"},  # response + EOS + 1 token before = 7: just kept
    ]
    examples = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", records), fmt)
    tokenized, stats = tokenize_examples(examples, ByteTokenizer(), seq_len=6)
    assert [t.tokens.tolist() for t in tokenized] == [
        ids("abc>xy") + [EOS],
        ids("fgh>xy") + [EOS],
        ids(">uvwxy") + [EOS],
        ids(">vwxyz") + [EOS],
    ]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert [t.loss_mask.tolist() for t in tokenized] == masks
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped, stats.longest) == (5, 4, 2, 1, 13)
    assert stats.tokens == 28 and stats.loss_tokens == 18


def test_truncated_chat_keeps_whole_last_reply(tmp_path):
    fmt = SFTFormat(user_template="{content}", assistant_template="{content}")
    chat = {"messages": [{"role": "user", "content": "uu"}, {"role": "assistant", "content": "aaa"}] * 2}
    examples = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", [chat]), fmt)
    # uu aaa E uu aaa E = 12 tokens; seq_len 7 keeps the last 8: "a" E "uu" "aaa" E.
    (tok,), stats = tokenize_examples(examples, ByteTokenizer(), seq_len=7)
    assert tok.tokens.tolist() == ids("a") + [EOS] + ids("uuaaa") + [EOS]
    assert tok.loss_mask.tolist() == [1, 0, 0, 1, 1, 1, 1]
    assert stats.truncated == 1


def test_no_response_token_after_truncation_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "response": "r" * 20}] * 3)
    with pytest.raises(InputError, match=r"long.jsonl: none of its 3 examples keeps a response token .* seq_len"):
        tokenize_examples(load_sft_examples(path), ByteTokenizer(), seq_len=10)


# ---------------------------------------------------------------------------------------------
# Packing


def random_examples(n: int, seq_len: int, seed: int = 0) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(2, seq_len + 2, size=n):
        tokens = rng.integers(4, 500, size=length).astype(np.int32)
        out.append(TokenizedExample(tokens, (rng.random(length - 1) < 0.5).astype(np.float32)))
    return out


@pytest.mark.parametrize("bins", [1, 3, 16])
def test_first_fit_rows_equal_grain_first_fit(bins):
    seq_len = 24
    examples = random_examples(120, seq_len, seed=bins)
    features = [{"inputs": e.tokens[:-1], "targets": e.tokens[1:], "loss_mask": e.loss_mask} for e in examples]
    reference = list(
        FirstFitPackIterDataset(
            grain.MapDataset.source(features).to_iter_dataset(),
            length_struct={k: seq_len for k in ("inputs", "targets", "loss_mask")},
            num_packing_bins=bins,
            shuffle_bins=False,
        )
    )
    batch = make_sft_eval_batches(examples, seq_len=seq_len, global_batch_size=1, packing_bins=bins)
    assert len(batch) == len(reference)
    for ours, ref in zip(batch, reference, strict=True):
        for key in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(ours[key][0], ref[key])
        np.testing.assert_array_equal(ours["segment_ids"][0], ref["inputs_segment_ids"])
        np.testing.assert_array_equal(ours["positions"][0], ref["inputs_positions"])


def split_rows(batch) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss_mask) of each example packed in a batch, checking segments and positions."""
    found = []
    for r in range(batch["inputs"].shape[0]):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (pos[used:] == 0).all()
        assert all((batch[k][r, used:] == 0).all() for k in ("inputs", "targets", "loss_mask"))
        starts = np.flatnonzero(np.diff(seg[:used], prepend=0))
        assert seg[:used][starts].tolist() == list(range(1, len(starts) + 1))  # 1, 2, ... per example
        for a, b in zip(starts, [*starts[1:], used], strict=True):
            np.testing.assert_array_equal(pos[a:b], np.arange(b - a))
            tokens = np.concatenate([batch["inputs"][r, a:b], batch["targets"][r, b - 1 : b]])
            np.testing.assert_array_equal(batch["inputs"][r, a + 1 : b], batch["targets"][r, a : b - 1])
            found.append((tokens, batch["loss_mask"][r, a:b]))
    return found


def as_key(tokens, mask) -> tuple:
    return tuple(tokens.tolist()), tuple(mask.tolist())


def test_train_batches_pack_whole_examples_each_once_per_epoch():
    seq_len, batch_size = 32, 4
    examples = random_examples(90, seq_len, seed=1)
    it = make_sft_train_iterator(examples, seq_len=seq_len, global_batch_size=batch_size, seed=5, packing_bins=8)
    epoch_rows = len(it.epoch_rows(0))
    seen = []
    while it.get_state()["epoch"] == 0:
        batch = next(it)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            k: ((batch_size, seq_len), np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS
        }
        seen += split_rows(batch)
    # An epoch: every example exactly once, whole (a batch that straddles epochs adds a few more).
    counts = {}
    for tokens, mask in seen:
        counts[as_key(tokens, mask)] = counts.get(as_key(tokens, mask), 0) + 1
    expected = {}
    for e in examples:
        expected[as_key(e.tokens, e.loss_mask)] = expected.get(as_key(e.tokens, e.loss_mask), 0) + 1
    assert set(counts) == set(expected)
    assert sum(counts.values()) - len(examples) < seq_len * batch_size  # only the straddling batch's extras
    if epoch_rows % batch_size == 0:
        assert counts == expected
    assert 0.5 < it.epoch_packing_efficiency(0) <= 1.0
    # Another epoch is another order; another seed too.
    assert [r.tolist() for r in it.epoch_rows(1)] != [r.tolist() for r in it.epoch_rows(0)]
    first = {}
    for seed in (5, 6):
        fresh = make_sft_train_iterator(
            examples, seq_len=seq_len, global_batch_size=batch_size, seed=seed, packing_bins=8
        )
        first[seed] = next(fresh)["inputs"]
    assert not np.array_equal(first[5], first[6])


def test_packing_efficiency_is_the_non_padding_fraction():
    examples = [TokenizedExample(np.arange(4, 10, dtype=np.int32), np.ones(5, np.float32))] * 3
    (batch,) = make_sft_eval_batches(examples, seq_len=8, global_batch_size=4)
    # Three examples of 5 positions in rows of 8: one per row, plus one empty row.
    assert batch["segment_ids"].sum(axis=1).tolist() == [5, 5, 5, 0]
    assert packing_efficiency(batch) == 15 / 32


def test_train_iterator_restores_exactly_through_json():
    examples = random_examples(40, 16, seed=2)
    make = lambda: make_sft_train_iterator(examples, seq_len=16, global_batch_size=6, seed=3, packing_bins=4)  # noqa: E731
    it = make()
    states, batches = [], []
    for _ in range(30):  # several epochs
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    assert states[-1]["epoch"] >= 2
    for k in (0, 1, 7, 13, 29):
        restored = make()
        restored.set_state(states[k])
        for expected in batches[k:]:
            got = next(restored)
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(got[key], expected[key])
    with pytest.raises(ValueError, match="state"):
        make().set_state({"epoch": 0, "row": 10**6})


def test_grain_first_fit_state_restores_through_json():
    """Evidence for sft_packing's docstring: grain's packer restores exactly from JSON too (it is slower)."""
    examples = random_examples(60, 16, seed=4)
    features = [{"inputs": e.tokens[:-1], "targets": e.tokens[1:]} for e in examples]

    def make():
        # No shuffle: grain's index shuffle costs milliseconds per index on tiny datasets.
        source = grain.MapDataset.source(features).repeat().to_iter_dataset()
        return iter(FirstFitPackIterDataset(source, length_struct={"inputs": 16, "targets": 16}, num_packing_bins=4))

    it = make()
    states, rows = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(it.get_state())))
        rows.append(next(it))
    for k in (0, 5, 23):
        restored = make()
        restored.set_state(states[k])
        for expected in rows[k:]:
            np.testing.assert_array_equal(next(restored)["inputs"], expected["inputs"])


def test_processes_get_disjoint_rows_whose_union_is_the_one_process_batch():
    examples = random_examples(50, 16, seed=6)
    common = {"seq_len": 16, "global_batch_size": 4, "packing_bins": 4}
    one = make_sft_train_iterator(examples, seed=1, **common)
    two = [make_sft_train_iterator(examples, seed=1, process_index=p, process_count=2, **common) for p in (0, 1)]
    for _ in range(12):
        full = next(one)
        halves = [next(it) for it in two]
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(halves[0][key], full[key][0::2])
            np.testing.assert_array_equal(halves[1][key], full[key][1::2])
    assert two[0].get_state() == two[1].get_state() == one.get_state()
    eval_one = make_sft_eval_batches(examples, **common)
    eval_two = [make_sft_eval_batches(examples, process_index=p, process_count=2, **common) for p in (0, 1)]
    assert len(eval_two[0]) == len(eval_two[1]) == len(eval_one)
    for full, h0, h1 in zip(eval_one, *eval_two, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(np.stack([h0[key], h1[key]], 1).reshape(full[key].shape), full[key])


def test_eval_batches_cover_every_example_once():
    examples = random_examples(37, 20, seed=7)
    batches = make_sft_eval_batches(examples, seq_len=20, global_batch_size=3, packing_bins=5)
    found = [as_key(t, m) for b in batches for t, m in split_rows(b)]
    assert sorted(found) == sorted(as_key(e.tokens, e.loss_mask) for e in examples)
    assert make_sft_eval_batches(examples, seq_len=20, global_batch_size=3, packing_bins=5) is not batches
    capped = make_sft_eval_batches(examples, seq_len=20, global_batch_size=3, packing_bins=5, max_batches=2)
    assert len(capped) == 2 and all(np.array_equal(capped[1][k], batches[1][k]) for k in BATCH_KEYS)


def test_end_to_end_sentencepiece_batches(tmp_path, sp_tok):
    examples = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", arithmetic_records(60, seed=3)))
    tokenized, stats = tokenize_examples(examples, sp_tok, seq_len=64)
    it = make_sft_train_iterator(tokenized, seq_len=64, global_batch_size=4, seed=0)
    batch = next(it)
    for tokens, mask in split_rows(batch):
        text = sp_tok.decode(tokens[1:][mask > 0])
        assert tokens[-1] == sp_tok.eos_id and mask[-1] == 1
        assert text.split(" #### ")[1] == text.split(" = ")[1].split(" ")[0]  # a response, whole


def test_first_fit_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="packing_bins"):
        first_fit_rows(np.array([3]), np.arange(1), 8, 0)
    with pytest.raises(ValueError, match="more than seq_len"):
        first_fit_rows(np.array([9]), np.arange(1), 8, 2)
    with pytest.raises(ValueError, match="divisible"):
        make_sft_train_iterator(random_examples(4, 8), seq_len=8, global_batch_size=3, seed=0, process_count=2)


# ---------------------------------------------------------------------------------------------
# Answers


def test_extract_answer_and_exact_match():
    assert extract_answer("so 3 + 4 = 7 #### 7 ", "after:####") == "7"
    assert extract_answer("no marker", "after:####") is None
    assert extract_answer("  Paris \n", "full") == "Paris"
    assert extract_answer("answer: 42, then 43", r"regex:answer: (\d+)") == "42"
    assert extract_answer("x=12 y=13", r"regex:\d+") == "12"
    assert extract_answer("nothing", r"regex:\d+") is None
    assert exact_match("3 + 4 = 7 #### 7", "... #### 7", "after:####")
    assert not exact_match("3 + 4 = 8 #### 8", "#### 7", "after:####")
    assert not exact_match("7", "#### 7", "after:####")  # no marker in the prediction
    with pytest.raises(InputError, match="no answer"):
        exact_match("#### 7", "seven", "after:####")
    for bad in ("after:", "regex:(", "fuzzy", "full:x"):
        with pytest.raises(ConfigError, match="answer extractor"):
            check_extractor(bad)


def test_check_references_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "#### 1"}, {"prompt": "b", "response": "2"}])
    with pytest.raises(InputError, match=r"t.jsonl:2: the reference has no answer"):
        check_references(load_sft_eval_pairs(path), "after:####")


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([{"prompt": "a"}], r":1: missing key 'response'"),
        ([{"prompt": "a", "response": "b"}, "{not json"], r":2: invalid JSON"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], r":1: key 'messages\[0\].role': unknown role 'robot'"),
        ([{"messages": [{"role": "user"}]}], r":1: key 'messages\[0\]': message has no 'content'"),
        (
            [{"messages": [{"role": "user", "content": 5}]}],
            r":1: key 'messages\[0\].content': expected a string, got int",
        ),
        ([{"messages": [{"role": "user", "content": "q"}]}], r":1: key 'messages': the chat has no assistant message"),
        ([{"messages": "hi"}], r":1: key 'messages': expected a non-empty list"),
        ([{"prompt": 3, "response": "b"}], r":1: key 'prompt': expected a string, got int"),
        ([{"prompt": "a", "response": {"x": 1}}], r":1: key 'response': expected a string or a list of instances"),
        ([{"prompt": "a", "response": []}], r":1: key 'response': empty list of instances"),
        ([{"prompt": "a", "response": [{"input": ""}]}], r":1: key 'response\[0\]': missing key 'output'"),
        ([{"prompt": "a", "response": ["x"]}], r":1: key 'response\[0\]': expected an object, got str"),
        ([[1, 2]], r":1: expected a JSON object, got an array"),
        (["", "  "], r": empty file"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, lines, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(InputError, match=pattern) as e:
        load_sft_examples(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_sft_examples(tmp_path / "nope.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match=r"b.jsonl:2: not UTF-8"):
        load_sft_examples(tmp_path / "b.jsonl")
    with pytest.raises(InputError, match="no examples"):
        tokenize_examples([], ByteTokenizer(), seq_len=8)


class AsciiTokenizer(ByteTokenizer):
    """Refuses non-ASCII text, as the char tokenizer refuses characters outside its vocabulary."""

    def encode(self, text: str) -> list[int]:
        if not text.isascii():
            raise ValueError("not ASCII")
        return super().encode(text)


def test_text_the_tokenizer_cannot_encode_names_the_example(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "é"}])
    with pytest.raises(InputError, match=r"d.jsonl:2: the tokenizer cannot encode this example: not ASCII"):
        tokenize_examples(load_sft_examples(path), AsciiTokenizer(), seq_len=8)


def test_bad_format_templates():
    with pytest.raises(ConfigError, match=r"prompt_template: must hold \{prompt\} exactly once"):
        SFTFormat(prompt_template="no placeholder")
    with pytest.raises(ConfigError, match="assistant_template"):
        SFTFormat(assistant_template="{content}{content}")
    with pytest.raises(ConfigError, match="response_field"):
        SFTFormat(response_field="")
