"""Tokenizers: exact ids, exact round trips, saving, loading and fingerprints."""

import hashlib
import json
import random

import flaxpod.data.tokenizer as tokenizer_module
import pytest
from flaxpod.data.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_from_config,
    train_char_tokenizer,
    train_sentencepiece,
)


def grammar_text(seed: int, n_lines: int = 400) -> str:
    """Code-like lines of a small invented grammar: indentation, digits, blank lines."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "omega", "x", "y", "zeta_1"]
    lines = []
    for _ in range(n_lines):
        indent = "    " * rng.randint(0, 3)
        a, b = rng.choice(names), rng.choice(names)
        lines.append(
            rng.choice(
                [
                    f"{indent}def {a}({b}, n={rng.randint(0, 999)}):",
                    f"{indent}{a} = {b} + {rng.randint(0, 99)}  # note",
                    f"{indent}return {a}[{rng.randint(0, 9)}]",
                    "",
                ]
            )
        )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    return train_sentencepiece([grammar_text(0)], vocab_size=400)


def test_char_exact_ids_and_round_trip():
    tok = train_char_tokenizer("hello world\n")
    assert tok.kind == "char"
    assert tok.chars == ["\n", " ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 9
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (None, None, None)
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    assert tok.encode("") == []
    assert tok.encode_batch(["wd", "\n "]) == [[8, 2], [0, 1]]
    assert tok.decode(tok.encode("world hello\n")) == "world hello\n"


def test_char_non_ascii_vocab_is_sorted_by_code_point():
    tok = train_char_tokenizer("zé a€")
    assert tok.chars == [" ", "a", "z", "é", "€"]
    assert tok.encode("€éza") == [4, 3, 2, 1]


def test_char_unknown_character_names_it_and_its_position():
    tok = train_char_tokenizer("hello world\n")
    with pytest.raises(ValueError, match=r"character '!' at position 4"):
        tok.encode("held!o")
    with pytest.raises(ValueError, match=r"'\\t' at position 0"):
        tok.encode("\thello")
    with pytest.raises(ValueError, match="at position 1"):  # beyond the last vocab char
        tok.encode("h~")


def test_char_save_load_is_json_and_atomic(tmp_path):
    tok = train_char_tokenizer("to be or not to be\n")
    tok.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tokenizer.json"]
    raw = (tmp_path / "run" / "tokenizer.json").read_bytes()
    assert json.loads(raw) == {"kind": "char", "chars": tok.chars}
    assert tok.fingerprint() == hashlib.sha256(raw).hexdigest()
    loaded = load_tokenizer(tmp_path / "run")
    assert isinstance(loaded, CharTokenizer)
    assert loaded.encode("not to be") == tok.encode("not to be")
    assert loaded.fingerprint() == tok.fingerprint()


def test_sentencepiece_vocab_and_special_ids(sp_tok):
    assert sp_tok.kind == "sentencepiece"
    assert sp_tok.vocab_size == 400
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
    # BPE learned pieces from the grammar: the text compresses well below 1 id per char.
    text = grammar_text(0)
    assert len(sp_tok.encode(text)) < 0.6 * len(text)


def test_sentencepiece_round_trips_exactly(sp_tok):
    samples = [
        grammar_text(0),
        grammar_text(7),  # unseen lines of the same grammar
        "        deeply(indented)  \n\n\n\ttabbed\n",
        " leading space and trailing spaces   ",
        "naïve café 中文 \x00 emoji 🙂\n",  # characters never seen: byte fallback
        "",
    ]
    for text in samples:
        assert sp_tok.decode(sp_tok.encode(text)) == text
    assert sp_tok.encode_batch(samples) == [sp_tok.encode(t) for t in samples]
    # Indentation is carried by whitespace-only pieces, not dropped or merged into words.
    pieces = [sp_tok.id_to_piece(i) for i in sp_tok.encode("\n        return x")]
    assert "".join(pieces).replace("\u2581", " ") == "\n        return x"
    assert any(set(p) == {"\u2581"} and len(p) >= 4 for p in pieces)


def test_sentencepiece_long_text_segmentation_gives_identical_ids(sp_tok, monkeypatch):
    text = grammar_text(3, n_lines=12_000)  # > 64k chars: encoded in segments
    assert len(text) > 3 * 65536
    assert sp_tok.encode(text) == sp_tok._sp.encode(text)
    # Dozens of cuts, many landing inside indentation runs, still change nothing.
    monkeypatch.setattr(tokenizer_module, "_SEGMENT_CHARS", 97)
    text = grammar_text(4)
    assert len(tokenizer_module._segments(text)) > 50
    assert sp_tok.encode(text) == sp_tok._sp.encode(text)


def test_sentencepiece_save_load_and_fingerprints(sp_tok, tmp_path):
    sp_tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]
    raw = (tmp_path / "tokenizer.model").read_bytes()
    assert sp_tok.fingerprint() == hashlib.sha256(raw).hexdigest()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, SentencePieceTokenizer)
    text = grammar_text(5)
    assert loaded.encode(text) == sp_tok.encode(text)
    assert loaded.fingerprint() == sp_tok.fingerprint()
    # Training is deterministic; other text gives another model.
    assert train_sentencepiece([grammar_text(0)], 400).fingerprint() == sp_tok.fingerprint()
    assert train_sentencepiece([grammar_text(1)], 400).fingerprint() != sp_tok.fingerprint()


def test_sentencepiece_vocab_too_large_suggests_smaller():
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size: 5000 .* vocab_size <= \d+"):
        train_sentencepiece([grammar_text(0, n_lines=50)], vocab_size=5000)


def test_load_tokenizer_missing_names_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_tokenizer_from_config_trains_once_then_reuses(tmp_path):
    run = tmp_path / "run"
    tok = tokenizer_from_config("sentencepiece", [grammar_text(0)], 400, "bpe", run)
    assert (run / "tokenizer.model").is_file()
    # A resumed run loads the saved tokenizer even if it is handed other text.
    again = tokenizer_from_config("sentencepiece", grammar_text(9), 400, "bpe", run)
    assert again.fingerprint() == tok.fingerprint()
    with pytest.raises(ValueError, match="tokenizer.kind"):
        tokenizer_from_config("char", "abc", 0, "bpe", run)

    char = tokenizer_from_config("char", ["ab", "ca"], 0, "", tmp_path / "c")
    assert char.chars == ["a", "b", "c"]
    assert load_tokenizer(tmp_path / "c").fingerprint() == char.fingerprint()
    with pytest.raises(ValueError, match="tokenizer.kind: expected"):
        tokenizer_from_config("wordpiece", "abc", 10, "bpe", tmp_path / "w")
