"""Tokenizers backed by the `tokenizers` library: any Hugging Face `tokenizer.json`.

The library is the Rust implementation transformers itself runs, so byte-level BPE (GPT-2,
Llama-3, SmolLM), WordPiece (BERT) and Unigram files give exactly transformers' ids without a
hand-written encoder. flaxpod saves one in a run as `hf_tokenizer.json`: the tokenizer.json
object plus what transformers keeps in tokenizer_config.json and flaxpod needs, in one file (a
checkpoint stores the tokenizer as one file, and its sha256 is the fingerprint prepared shards
are checked against):

    {"format": "flaxpod-hf-tokenizer", "version": 1,
     "special_tokens": {"bos": "<s>", "eos": "</s>", "pad": null, "unk": "<unk>"},
     "add_special_tokens": {"prefix": ["<s>"], "suffix": []},
     "tokenizer": {... tokenizer.json ...}}

`add_special_tokens` is the BOS/EOS policy: what transformers' `tokenizer(text)` puts before
and after the text ids (read from the file's post-processor, which transformers applies as is).
`encode` itself adds nothing, like every flaxpod tokenizer; `encode_for_model` adds them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from flaxpod.data.tokenizer import HF_FILE, SentencePieceTokenizer
from flaxpod.data.tokenizer import Tokenizer as FlaxpodTokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tokenizers.decoders import DecodeStream

FORMAT = "flaxpod-hf-tokenizer"
ROLES = ("bos", "eos", "pad", "unk")
# Special tokens of a byte-level BPE trained by flaxpod: GPT-2's end of text (eos, also the
# document separator) and a padding token, ids 0 and 1.
BPE_EOS, BPE_PAD = "<|endoftext|>", "<|pad|>"
# Probe text for reading the post-processor's template; any text with at least one id works.
_PROBE = "hello"


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(FlaxpodTokenizer):
    """A `tokenizers.Tokenizer` with flaxpod's special-token roles and transformers' BOS policy."""

    kind = "huggingface"
    filename = HF_FILE

    def __init__(self, spec: dict, raw: bytes | None = None, where: str = "tokenizer"):
        if spec.get("format") != FORMAT or not isinstance(spec.get("tokenizer"), dict):
            raise ValueError(f"{where}: not a flaxpod Hugging Face tokenizer file (format {spec.get('format')!r})")
        self.spec = spec
        self._raw = raw if raw is not None else json.dumps(spec, ensure_ascii=False, sort_keys=True).encode()
        try:
            self.tok = Tokenizer.from_str(json.dumps(spec["tokenizer"]))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{where}: tokenizers cannot read it: {e}") from None
        self.tok.no_padding()
        self.tok.no_truncation()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {role: spec.get("special_tokens", {}).get(role) for role in ROLES}
        ids = {}
        for role, token in self.special_tokens.items():
            ids[role] = None if token is None else self.tok.token_to_id(token)
            if token is not None and ids[role] is None:
                raise ValueError(f"{where}: special token {role}={token!r} is not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = ids["bos"], ids["eos"], ids["pad"], ids["unk"]
        self._policy = spec.get("add_special_tokens") or {}
        self._prefix_ids = [self._id(t, where) for t in self._policy.get("prefix", [])]
        self.suffix_ids = [self._id(t, where) for t in self._policy.get("suffix", [])]
        self.add_bos = bool(self._prefix_ids)

    @property
    def prefix_ids(self) -> list[int]:
        return list(self._prefix_ids)

    def _id(self, token: str, where: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{where}: add_special_tokens names {token!r}, which is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust threads over the batch (TOKENIZERS_PARALLELISM governs them).
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_for_model(self, text: str) -> list[int]:
        return self.prefix_ids + self.encode(text) + self.suffix_ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_stream(self, context_ids: Sequence[int], new_ids: Sequence[int]) -> Iterator[str]:
        # The library's own streaming decoder: it buffers byte tokens until a UTF-8 character is whole.
        stream = DecodeStream(ids=[int(i) for i in context_ids], skip_special_tokens=True)
        for i in new_ids:
            piece = stream.step(self.tok, int(i))
            if piece:
                yield piece

    def serialize(self) -> bytes:
        return self._raw

    def tokenizer_json(self) -> str:
        """The tokenizer.json text that `tokenizers` and transformers read."""
        return json.dumps(self.spec["tokenizer"], ensure_ascii=False, indent=2)

    def describe(self) -> dict:
        return {
            "special_tokens": dict(self.special_tokens),
            "add_bos": self.add_bos,
            "add_special_tokens": {
                "prefix": list(self._policy.get("prefix", [])),
                "suffix": list(self._policy.get("suffix", [])),
            },
            "model": self.spec["tokenizer"].get("model", {}).get("type"),
        }

    @classmethod
    def load(cls, path: Path) -> HFTokenizer:
        raw = path.read_bytes()
        try:
            spec = json.loads(raw.decode("utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        return cls(spec, raw=raw, where=str(path))

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, special_tokens: dict[str, str | None]) -> HFTokenizer:
        """Wraps a `tokenizers.Tokenizer`; the BOS/EOS policy is read from its post-processor."""
        with_specials = tok.encode(_PROBE, add_special_tokens=True)
        plain = tok.encode(_PROBE, add_special_tokens=False).ids
        ids, tokens = with_specials.ids, with_specials.tokens
        start = next((i for i in range(len(ids) - len(plain) + 1) if ids[i : i + len(plain)] == plain), None)
        if start is None:
            raise ValueError("tokenizer.json: its post-processor changes the text's own ids; flaxpod cannot follow it")
        end = start + len(plain)
        spec = {
            "format": FORMAT,
            "version": 1,
            "special_tokens": {role: special_tokens.get(role) for role in ROLES},
            "add_special_tokens": {"prefix": tokens[:start], "suffix": tokens[end:]},
            "tokenizer": json.loads(tok.to_str()),
        }
        return cls(spec)

    @classmethod
    def from_hf_files(cls, tokenizer_json: Path) -> HFTokenizer:
        """A tokenizer.json with the special tokens its directory's tokenizer_config.json and
        special_tokens_map.json name (as transformers reads them)."""
        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{tokenizer_json}: tokenizers cannot read it: {e}") from None
        return cls.from_tokenizer(tok, hf_special_tokens(tokenizer_json.parent, tok))


def hf_special_tokens(directory: Path, tok: Tokenizer) -> dict[str, str | None]:
    """bos/eos/pad/unk of an HF directory: tokenizer_config.json over special_tokens_map.json;
    unk falls back to the model's own unk_token; eos to BERT's sep_token."""
    found: dict[str, str | None] = dict.fromkeys(ROLES)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        for role in ROLES:
            token = _token_content(config.get(f"{role}_token"))
            if token is not None:
                found[role] = token
        if found["eos"] is None:
            found["eos"] = _token_content(config.get("sep_token"))
    if found["unk"] is None:
        found["unk"] = json.loads(tok.to_str()).get("model", {}).get("unk_token")
    return {role: t if t is not None and tok.token_to_id(t) is not None else None for role, t in found.items()}


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A GPT-2-style byte-level BPE trained with `tokenizers`: every text encodes (256 byte
    symbols), nothing is normalized, decode(encode(text)) == text; eos=<|endoftext|>, pad=<|pad|>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"tokenizer.vocab_size: byte-level BPE needs at least {len(alphabet) + 2}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_EOS, BPE_PAD], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer.from_tokenizer(tok, {"eos": BPE_EOS, "pad": BPE_PAD})


def sentencepiece_json(sp: SentencePieceTokenizer) -> str:
    """tokenizer.json of a flaxpod-trained SentencePiece model (identity normalization, no dummy
    prefix, byte fallback): what transformers' LlamaConverter builds from tokenizer.model with
    legacy=false and add_prefix_space=false, written here so that loading it needs neither
    protobuf nor sentencepiece (the parity test compares the two)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialize())
    if not sp.is_segmentable:
        raise ValueError("tokenizer: only SentencePiece models trained by flaxpod convert to tokenizer.json")
    # Piece types of the model proto: 2 unknown, 3 control, 4 user-defined.
    pieces = [(p.piece, p.type, p.score) for p in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p, score) for p, _, score in pieces], unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        # As transformers.tokenization_utils_base.generate_merges: every split of a piece into
        # two pieces is a merge, ranked by the merged piece's id (its BPE rank), then part lengths.
        merges = []
        for merged, rank in vocab.items():
            local = [
                (merged[:i], merged[i:]) for i in range(1, len(merged)) if merged[:i] in vocab and merged[i:] in vocab
            ]
            local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
            merges += [(rank, lr) for lr in local]
        merges.sort(key=lambda m: (m[0], len(m[1][0]), len(m[1][1])))
        unk = pieces[unk_id][0] if 0 <= unk_id < len(pieces) else None
        model = models.BPE(
            vocab=vocab, merges=[m for _, m in merges], byte_fallback=byte_fallback, fuse_unk=True, unk_token=unk
        )
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p, kind, _ in pieces if kind == 4])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p, kind, _ in pieces if kind in (2, 3)])
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=2)
