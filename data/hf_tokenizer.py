"""Tokenizer files for Hugging Face directories, and back.

SentencePiece: `tokenizer.model`, the equivalent fast `tokenizer.json` (so transformers needs
neither sentencepiece nor protobuf to load it) and a tokenizer_config.json naming LlamaTokenizer
with add_prefix_space=false, legacy=false and no BOS/EOS added, which reproduces our encoding
(identity normalization, no dummy prefix, byte fallback); the parity tests check ids and round trips.

Hugging Face (`tokenizers`): the tokenizer.json back as it came, with tokenizer_config.json
naming PreTrainedTokenizerFast, which applies the file's own post-processor (the BOS policy).

Char: a `tokenizer.json` written by hand for the `tokenizers` library: a WordLevel model over
the characters, split into single characters (`[\\s\\S]`, so newlines too), decoded by
concatenation. It needs no SentencePiece and loads as PreTrainedTokenizerFast. Import reads
that exact shape back into our CharTokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from flaxpod.data.hf_tokenizers import HFTokenizer, sentencepiece_json
from flaxpod.data.tokenizer import CharTokenizer, SentencePieceTokenizer, Tokenizer

CHAR_SPLIT = r"[\s\S]"


def _char_tokenizer_json(tok: CharTokenizer) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": CHAR_SPLIT}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        # An unknown character fails to encode, as with our tokenizer (U+FFFD is only the
        # placeholder name WordLevel requires).
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tok.chars)}, "unk_token": "\ufffd"},
    }


def write_hf_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> list[str]:
    """Writes the tokenizer files of an HF directory; returns their names."""
    common = {"clean_up_tokenization_spaces": False, "model_max_length": model_max_length}
    if isinstance(tok, CharTokenizer):
        (out_dir / "tokenizer.json").write_text(json.dumps(_char_tokenizer_json(tok), ensure_ascii=False))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **common}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return ["tokenizer.json", "tokenizer_config.json"]
    if isinstance(tok, HFTokenizer):
        return _write_hf(tok, out_dir, common)
    assert isinstance(tok, SentencePieceTokenizer)
    (out_dir / "tokenizer.model").write_bytes(tok.serialize())
    (out_dir / "tokenizer.json").write_text(sentencepiece_json(tok), encoding="utf-8")
    specials = {
        name: tok.id_to_piece(i)
        for name, i in (
            ("bos_token", tok.bos_id),
            ("eos_token", tok.eos_id),
            ("pad_token", tok.pad_id),
            ("unk_token", tok._sp.unk_id()),
        )
        if i is not None and i >= 0
    }
    config = {
        # transformers 5's LlamaTokenizer rebuilds a BPE model from the vocabulary, which breaks a
        # unigram model; the generic fast class runs tokenizer.json as written.
        "tokenizer_class": "LlamaTokenizer" if tok.model_type == "bpe" else "PreTrainedTokenizerFast",
        "add_bos_token": False,  # our encode adds no BOS/EOS; keep HF's ids identical
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        **specials,
        **common,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _write_hf(tok: HFTokenizer, out_dir: Path, common: dict) -> list[str]:
    specials = {f"{role}_token": t for role, t in tok.special_tokens.items() if t is not None}
    (out_dir / "tokenizer.json").write_text(tok.tokenizer_json(), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, **common}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _is_flaxpod_sentencepiece(hf_dir: Path, tok: SentencePieceTokenizer) -> bool:
    """A tokenizer.model as flaxpod trains and exports it: no dummy prefix and no BOS added, so
    our SentencePiece encoding is transformers' too. Third-party ones (Llama-2: dummy prefix,
    BOS) are read from their tokenizer.json instead, as transformers reads them."""
    config_path = hf_dir / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from None
    return tok.is_segmentable and config.get("add_bos_token") is not True


def read_hf_tokenizer(hf_dir: Path) -> Tokenizer | None:
    """Our tokenizer from an HF directory, giving transformers' ids: flaxpod's own SentencePiece
    `tokenizer.model`; else its tokenizer.json (character-level as written above, or any other
    through `tokenizers`). None when neither is there."""
    sp_path, path = hf_dir / "tokenizer.model", hf_dir / "tokenizer.json"
    if sp_path.is_file():
        sp = SentencePieceTokenizer.load(sp_path)
        if _is_flaxpod_sentencepiece(hf_dir, sp):
            return sp
        if not path.is_file():
            raise ValueError(
                f"{sp_path}: a third-party SentencePiece model without tokenizer.json; transformers' ids come from "
                "its own conversion: write the fast tokenizer once with "
                "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR), then import again"
            )
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    is_char = (
        model.get("type") == "WordLevel"
        and pre.get("type") == "Split"
        and (pre.get("pattern") or {}).get("Regex") == CHAR_SPLIT
        and not spec.get("added_tokens")
    )
    if not is_char:
        return HFTokenizer.from_hf_files(path)
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError(f"{path}: character ids are not 0..{len(by_id) - 1}")
    try:
        return CharTokenizer([c for c, _ in by_id])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
