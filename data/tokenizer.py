"""Tokenizers: nanoGPT's character tokenizer, a SentencePiece BPE/unigram tokenizer, and any
Hugging Face tokenizer.json through the `tokenizers` library (data/hf_tokenizers.py).

Each serializes to one small file in the run directory (never a pickle) and expose a
`fingerprint()`, the sha256 of exactly those bytes, so that later stages can refuse data
tokenized by a different tokenizer.
"""

from __future__ import annotations

import abc
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from hashlib import sha256
from pathlib import Path

import numpy as np
import sentencepiece as spm

CHAR_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "hf_tokenizer.json"  # data/hf_tokenizers.py: a tokenizer.json with flaxpod's metadata

# Special ids of trained SentencePiece models. pad is 0 so that zero-filled arrays read as
# padding; eos ends every document in the token stream; bos exists for finetuning formats.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The masked-LM objective's mask token: a SentencePiece user-defined symbol, so "[MASK]" in text
# encodes to its id (fill-mask prompts) and no ordinary text piece can produce it.
MASK_TOKEN = "[MASK]"
# Ids of context kept when decoding a stream: enough for any decoder's look-behind (a space
# before a word, a character split over up to four byte tokens) without growing with the text.
_DECODE_CONTEXT = 8


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Tokenizer(abc.ABC):
    """Text <-> token ids. `encode` adds no BOS/EOS; callers add them where a format needs."""

    kind: str
    filename: str
    vocab_size: int
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None
    # BOS policy: whether a model sequence starts with BOS (as transformers' tokenizer(text) does).
    add_bos: bool = False

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @property
    def prefix_ids(self) -> list[int]:
        """Ids that start every model sequence under the BOS policy (BOS, or nothing)."""
        return [self.bos_id] if self.add_bos and self.bos_id is not None else []

    def encode_for_model(self, text: str) -> list[int]:
        """Ids as transformers' `tokenizer(text)["input_ids"]` gives them: the BOS policy applied."""
        return self.prefix_ids + self.encode(text)

    def describe(self) -> dict:
        """Kind-specific facts for metadata (special tokens, BOS policy)."""
        return {"add_bos": self.add_bos}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` applied to each text."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens decode to nothing)."""

    def decode_stream(self, context_ids: Sequence[int], new_ids: Sequence[int]) -> Iterator[str]:
        """Text of `new_ids` after `context_ids`, in pieces as the ids arrive, each piece whole
        characters: ids that end inside a UTF-8 character (byte fallback) are held back until it
        completes, and never printed if it does not. Decoding in context keeps word-initial
        spaces that a decoder strips at the start of a text."""
        window = list(context_ids[-_DECODE_CONTEXT:])
        shown = self.decode(window)
        for i in new_ids:
            window.append(int(i))
            text = self.decode(window)
            if text.endswith("\ufffd") or not text.startswith(shown):
                continue  # an incomplete character: wait for the ids that complete it
            if len(text) > len(shown):
                yield text[len(shown) :]
            shown = text

    @abc.abstractmethod
    def serialize(self) -> bytes:
        """The exact bytes `save` writes; `fingerprint` hashes them."""

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's file into `directory` (created if missing), atomically."""
        _write_atomically(Path(directory) / self.filename, self.serialize())

    def fingerprint(self) -> str:
        """sha256 hex digest of the serialized model: the tokenizer's identity."""
        return sha256(self.serialize()).hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """nanoGPT's shakespeare_char tokenizer: one id per character, ids in sorted order."""

    kind = "char"
    filename = CHAR_FILE

    def __init__(self, chars: Sequence[str]):
        if any(len(c) != 1 for c in chars) or list(chars) != sorted(set(chars)):
            raise ValueError("CharTokenizer: chars must be distinct single characters, sorted")
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        # Python sorts strings by code point, so the vocabulary's code points are sorted
        # too and encoding is a vectorized binary search instead of a per-character dict.
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    def encode(self, text: str) -> list[int]:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, codepoints)
        known = ids < self.vocab_size
        known[known] = self._codepoints[ids[known]] == codepoints[known]
        if not known.all():
            pos = int(np.argmin(known))
            raise ValueError(
                f"char tokenizer: character {text[pos]!r} at position {pos} is not in its "
                f"vocabulary of {self.vocab_size} characters (it was trained on other text)"
            )
        return ids.tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def serialize(self) -> bytes:
        return json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False).encode()

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            if spec.get("kind") != "char" or not isinstance(spec.get("chars"), list):
                raise ValueError('expected {"kind": "char", "chars": [...]}')
            return cls(spec["chars"])
        except ValueError as e:
            raise ValueError(f"{path}: not a char tokenizer file: {e}") from None


# Splits before a space that follows a non-space: a word start in SentencePiece's own
# pre-tokenization, which no piece of a model trained by `train_sentencepiece` crosses.
_WORD_START = re.compile(r"(?<! ) ")
_SEGMENT_CHARS = 1 << 16


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model held in memory as its serialized proto."""

    kind = "sentencepiece"
    filename = SENTENCEPIECE_FILE

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.vocab_size = self._sp.vocab_size()
        self.eos_id, self.bos_id, self.pad_id = (
            i if i >= 0 else None for i in (self._sp.eos_id(), self._sp.bos_id(), self._sp.pad_id())
        )
        self._segmentable = _is_segmentable(self.model_proto)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not self._segmentable:
            return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)
        # SentencePiece's encoder slows down superlinearly on megabyte strings, so long
        # texts are cut at word starts (which gives identical ids) and encoded in parallel.
        segments = [_segments(t) for t in texts]
        flat = self._sp.encode([s for segs in segments for s in segs], num_threads=os.cpu_count())
        out, i = [], 0
        for segs in segments:
            out.append([t for ids in flat[i : i + len(segs)] for t in ids])
            i += len(segs)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def serialize(self) -> bytes:
        return self.model_proto

    @property
    def model_type(self) -> str:
        """`bpe` or `unigram` (or another SentencePiece model type, lower-case)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self.model_proto)
        return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()

    @property
    def is_segmentable(self) -> bool:
        """Whether this is a model as flaxpod trains it (identity normalization, no dummy prefix)."""
        return self._segmentable

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def token_id(self, piece: str) -> int | None:
        """The id of a whole piece (a special token such as [MASK]), or None if the model lacks it."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def special_ids(self) -> list[int]:
        """Ids that are not text: control pieces (pad, bos, eos), unknown, and user-defined symbols."""
        from sentencepiece import sentencepiece_model_pb2

        piece = sentencepiece_model_pb2.ModelProto.SentencePiece
        not_text = (piece.CONTROL, piece.UNKNOWN, piece.USER_DEFINED)
        pieces = sentencepiece_model_pb2.ModelProto.FromString(self.model_proto).pieces
        return [i for i, p in enumerate(pieces) if p.type in not_text]

    @classmethod
    def load(cls, path: Path) -> SentencePieceTokenizer:
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise ValueError(f"{path}: not a SentencePiece model: {e}") from None


def _segments(text: str) -> list[str]:
    out, start = [], 0
    while len(text) - start > _SEGMENT_CHARS:
        cut = _WORD_START.search(text, start + _SEGMENT_CHARS)
        if cut is None:
            break
        out.append(text[start : cut.start()])
        start = cut.start()
    out.append(text[start:])
    return out


def _is_segmentable(model_proto: bytes) -> bool:
    """True if cutting text before a word-initial space cannot change the encoding."""
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    norm, trainer = m.normalizer_spec, m.trainer_spec
    return (
        norm.name == "identity"
        and not norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces
        and trainer.split_by_whitespace
        and not trainer.treat_whitespace_as_suffix
        and not any(" " in p for p in trainer.user_defined_symbols)
    )


def _training_sentences(texts: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Blocks of whole lines up to `chunk_chars` characters, newlines kept.

    Feeding multi-line blocks (not single lines) lets BPE learn pieces such as ':\n', and
    cutting over-long lines keeps every block under SentencePiece's max_sentence_length.
    """
    for text in texts:
        block: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if size + len(line) > chunk_chars and block:
                yield "".join(block)
                block, size = [], 0
            for i in range(0, len(line), chunk_chars):
                piece = line[i : i + chunk_chars]
                if len(piece) == chunk_chars:
                    yield piece
                else:
                    block.append(piece)
                    size += len(piece)
        if block:
            yield "".join(block)


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    seed_sentencepiece_size: int = 1_000_000,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 10_000,
    seed: int = 0,
    user_defined_symbols: Sequence[str] = (),
) -> SentencePieceTokenizer:
    """Train a SentencePiece model in memory; ids: pad=0, unk=1, bos=2, eos=3.

    Text round-trips exactly: no normalization, whitespace kept (indentation becomes
    whitespace-only pieces), no dummy prefix, and unknown characters fall back to bytes.
    `user_defined_symbols` (e.g. [MASK]) get the ids after eos and always encode as one piece.
    At most `input_sentence_size` blocks of lines (each up to max_sentence_length/4
    characters, so at most about 40 MB by default) are sampled: 10 MB trains in seconds.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer.model_type: expected 'bpe' or 'unigram', got {model_type!r}")
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts, max_sentence_length // 4),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            seed_sentencepiece_size=seed_sentencepiece_size,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}),
        )
    except RuntimeError as e:
        limit = re.search(r"<= (\d+)", str(e))
        if "too high" in str(e) and limit:
            raise ValueError(
                f"tokenizer.vocab_size: {vocab_size} is more than this text supports; "
                f"use a vocab_size <= {limit.group(1)} or train on more text"
            ) from None
        if "vocab_size" in str(e) or "Vocabulary size" in str(e):
            raise ValueError(f"tokenizer.vocab_size: {vocab_size} rejected: {e}") from None
        raise ValueError(f"tokenizer: SentencePiece training failed: {e}") from None
    return SentencePieceTokenizer(writer.getvalue())


def train_char_tokenizer(text: str) -> CharTokenizer:
    """Vocabulary = the sorted distinct characters of `text` (65 for tiny shakespeare)."""
    if not text:
        raise ValueError("char tokenizer: cannot train on empty text")
    return CharTokenizer(sorted(set(text)))


def is_char_tokenizer_file(path: Path) -> bool:
    """Whether a tokenizer.json is flaxpod's char format ({"kind": "char", ...}) rather than a
    Hugging Face tokenizer.json (which has a "model" object). Both use the same file name."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    return isinstance(spec, dict) and spec.get("kind") == "char"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved in a run's or dataset's tokenizer directory, or any other tokenizer
    flaxpod reads: a Hugging Face model directory (as transformers would load it), a
    tokenizer.json (char or Hugging Face) or a SentencePiece .model file."""
    from flaxpod.data import hf_tokenizer, hf_tokenizers

    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            if is_char_tokenizer_file(path):
                return CharTokenizer.load(path)
            if path.name == HF_FILE:
                return hf_tokenizers.HFTokenizer.load(path)
            return hf_tokenizers.HFTokenizer.from_hf_files(path)
        return SentencePieceTokenizer.load(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer {path}: no such directory or file")
    if (path / HF_FILE).is_file():
        return hf_tokenizers.HFTokenizer.load(path / HF_FILE)
    char, sp = path / CHAR_FILE, path / SENTENCEPIECE_FILE
    if char.is_file() and not sp.is_file() and is_char_tokenizer_file(char):
        return CharTokenizer.load(char)
    if sp.is_file() and not char.is_file():
        return SentencePieceTokenizer.load(sp)
    found = hf_tokenizer.read_hf_tokenizer(path)
    if found is None:
        raise FileNotFoundError(f"no tokenizer in {path}: expected {CHAR_FILE} or {SENTENCEPIECE_FILE} (or {HF_FILE})")
    return found


def has_tokenizer(directory: str | Path) -> bool:
    """True if `directory` holds a saved tokenizer file."""
    return any((Path(directory) / f).is_file() for f in (CHAR_FILE, SENTENCEPIECE_FILE, HF_FILE))


def train_tokenizer_of_kind(
    kind: str, texts: Iterable[str], vocab_size: int, model_type: str, special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """Trains a tokenizer of config kind `kind`: char, sentencepiece, or huggingface (byte-level BPE).
    `special_tokens` (the masked-LM's [MASK]) are supported by sentencepiece only."""
    if special_tokens and kind != "sentencepiece":
        raise ValueError(f"tokenizer.kind: special tokens {list(special_tokens)} need a sentencepiece tokenizer")
    if kind == "char":
        return train_char_tokenizer("".join(texts))
    if kind == "sentencepiece":
        return train_sentencepiece(texts, vocab_size, model_type, user_defined_symbols=special_tokens)
    if kind == "huggingface":
        from flaxpod.data.hf_tokenizers import train_byte_level_bpe

        return train_byte_level_bpe(texts, vocab_size)
    raise ValueError(f"tokenizer.kind: expected 'char', 'sentencepiece' or 'huggingface', got {kind!r}")


def tokenizer_from_config(
    kind: str,
    text_sample: str | Iterable[str],
    vocab_size: int,
    model_type: str,
    directory: Path,
) -> Tokenizer:
    """Load the tokenizer saved in `directory`, or train one and save it there.

    Loading first means a resumed run keeps the tokenizer its tokens were made with. For
    kind "char", `vocab_size` and `model_type` are ignored (the text fixes the vocabulary).
    A loaded tokenizer of another kind than `kind` is an error.
    """
    directory = Path(directory)
    if has_tokenizer(directory):
        tok = load_tokenizer(directory)
        if tok.kind != kind:
            raise ValueError(f"tokenizer.kind: {directory} holds a {tok.kind!r} tokenizer, config asks {kind!r}")
        return tok
    texts = [text_sample] if isinstance(text_sample, str) else text_sample
    tok = train_tokenizer_of_kind(kind, texts, vocab_size, model_type)
    tok.save(directory)
    return tok
