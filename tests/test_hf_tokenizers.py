"""Hugging Face tokenizers (the `tokenizers` library) as flaxpod's third tokenizer kind.

Every tokenizer.json is built here (a byte-level BPE and a WordPiece trained with `tokenizers`,
SentencePiece models trained in-process); the reference for ids is transformers' AutoTokenizer
loading the same directory.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from flaxpod.data.hf_tokenizer import read_hf_tokenizer, write_hf_tokenizer
from flaxpod.data.hf_tokenizers import HF_FILE, HFTokenizer, train_byte_level_bpe
from flaxpod.data.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_char_tokenizer,
    train_sentencepiece,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

transformers = pytest.importorskip("transformers")

# Multilingual, emoji (with ZWJ and skin tone), combining marks, tabs, runs of spaces, CRLF.
HARD_TEXT = (
    "  two leading spaces, then\ttabs\t\tand   runs of spaces   \n\n"
    "Grüße aus Köln — naïve café, Ελληνικά, русский текст, עברית, العربية, हिन्दी, 日本語の文章、中文句子。\n"
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 e\u0301 (combining) \r\n  trailing spaces   "
)
TRAIN_TEXTS = [HARD_TEXT[i:] + " " + HARD_TEXT[:i] for i in range(0, len(HARD_TEXT), 7)] + [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def main():\n    return 0\n" * 10,
]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_byte_level_bpe(TRAIN_TEXTS, vocab_size=400)


def _auto(directory):
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def test_byte_level_bpe_matches_transformers_and_round_trips(bpe, tmp_path):
    write_hf_tokenizer(bpe, tmp_path, model_max_length=128)
    hf = _auto(tmp_path)
    for text in [HARD_TEXT, HARD_TEXT[5:77], "", " ", "\n\n\n", "unseen: ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ"]:
        ids = bpe.encode(text)
        assert ids == hf(text)["input_ids"] == bpe.encode_for_model(text)  # no BOS in this policy
        assert bpe.decode(ids) == text
    assert bpe.eos_id == hf.eos_token_id == 0 and bpe.pad_id == hf.pad_token_id == 1 and bpe.bos_id is None
    # Export and re-import: the same file content, hence the same fingerprint (shards still match).
    again = read_hf_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer) and again.fingerprint() == bpe.fingerprint()
    assert bpe.encode_batch([HARD_TEXT, "x"]) == [bpe.encode(HARD_TEXT), bpe.encode("x")]


def test_saved_run_tokenizer_round_trips_and_differs_from_char(bpe, tmp_path):
    bpe.save(tmp_path / "hf")
    assert (tmp_path / "hf" / HF_FILE).is_file()
    loaded = load_tokenizer(tmp_path / "hf")
    assert loaded.kind == "huggingface" and loaded.fingerprint() == bpe.fingerprint()
    spec = json.loads((tmp_path / "hf" / HF_FILE).read_text())
    assert spec["special_tokens"] == {"bos": None, "eos": "<|endoftext|>", "pad": "<|pad|>", "unk": None}
    assert spec["add_special_tokens"] == {"prefix": [], "suffix": []}
    # flaxpod's char tokenizer.json and a Hugging Face tokenizer.json share a name, not a format.
    train_char_tokenizer("abc").save(tmp_path / "char")
    assert isinstance(load_tokenizer(tmp_path / "char"), CharTokenizer)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "tokenizer.json").write_text(bpe.tokenizer_json())
    raw = load_tokenizer(tmp_path / "raw" / "tokenizer.json")
    assert isinstance(raw, HFTokenizer) and raw.encode(HARD_TEXT) == bpe.encode(HARD_TEXT)
    other = train_byte_level_bpe(TRAIN_TEXTS, vocab_size=380)
    assert other.fingerprint() != bpe.fingerprint()


def test_wordpiece_with_cls_sep_matches_transformers(tmp_path):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(TRAIN_TEXTS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(tmp_path / "bert")
    ours = load_tokenizer(tmp_path / "bert")
    hf = _auto(tmp_path / "bert")
    for text in [HARD_TEXT, "Hello WORLD", ""]:
        assert ours.encode_for_model(text) == hf(text)["input_ids"]
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.unk_id == 1 and ours.pad_id == 0 and ours.eos_id == 3  # sep ends a sequence
    assert ours.describe()["add_special_tokens"] == {"prefix": ["[CLS]"], "suffix": ["[SEP]"]}


def test_llama3_style_bos_policy(bpe, tmp_path):
    """A template post-processor that adds BOS (as Llama-3's tokenizer.json does) is the policy."""
    tok = Tokenizer.from_str(bpe.tokenizer_json())
    tok.add_special_tokens(["<|begin_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1", special_tokens=[("<|begin_of_text|>", bos)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(tmp_path / "l3")
    ours = load_tokenizer(tmp_path / "l3")
    assert (
        ours.add_bos and ours.bos_id == bos and ours.describe()["add_special_tokens"]["prefix"] == ["<|begin_of_text|>"]
    )
    hf = _auto(tmp_path / "l3")
    assert ours.encode_for_model(HARD_TEXT) == hf(HARD_TEXT)["input_ids"] == [bos, *bpe.encode(HARD_TEXT)]
    # Exported again, transformers still adds BOS itself.
    (tmp_path / "again").mkdir()
    write_hf_tokenizer(ours, tmp_path / "again", model_max_length=64)
    assert _auto(tmp_path / "again")(HARD_TEXT)["input_ids"] == ours.encode_for_model(HARD_TEXT)


def test_third_party_sentencepiece_matches_transformers_with_leading_spaces(tmp_path):
    """A Llama-2-style model (dummy prefix) as transformers saves it: ids and BOS policy are
    transformers', "  two" included (the SentencePiece processor itself gives one "▁" more)."""
    import io

    import sentencepiece as spm

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXTS), model_writer=writer, vocab_size=380, byte_fallback=True, minloglevel=2
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(writer.getvalue())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match="third-party SentencePiece model without tokenizer.json"):
        read_hf_tokenizer(src)
    _auto(src).save_pretrained(tmp_path / "llama2")
    ours, hf = read_hf_tokenizer(tmp_path / "llama2"), _auto(tmp_path / "llama2")
    assert ours.kind == "huggingface"
    for text in ["  two", "two", " two  three", HARD_TEXT]:
        assert ours.encode_for_model(text) == hf(text)["input_ids"]
    assert ours.add_bos == (hf("two")["input_ids"][:1] == [hf.bos_token_id])


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tiktoken", "google") or name == "sentencepiece.sentencepiece_model_pb2":
                raise ImportError(f"blocked: {name}")
    sys.meta_path.insert(0, Block())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    print(json.dumps({"ids": tok(sys.argv[2])["input_ids"], "class": type(tok).__name__}))
    """
)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_exported_sentencepiece_loads_without_protobuf_or_tiktoken(model_type, tmp_path):
    sp = train_sentencepiece(TRAIN_TEXTS, 380 if model_type == "bpe" else 365, model_type)
    write_hf_tokenizer(sp, tmp_path, model_max_length=64)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer.model").is_file()
    text = HARD_TEXT + " 12345"
    out = subprocess.run(
        [sys.executable, "-c", BLOCKER, str(tmp_path), text], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ids"] == sp.encode(text)  # BOS policy: none added, as flaxpod encodes
    assert isinstance(read_hf_tokenizer(tmp_path), SentencePieceTokenizer)


def test_rope_and_activation_read_as_transformers(tmp_path):
    from flaxpod.model.hf_weights import model_config_from_hf

    base = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "vocab_size": 64,
    }
    cases = [
        {"rope_theta": 12345.0},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}},
        {"rope_scaling": {"rope_type": "default", "rope_theta": 70000.0}, "rope_theta": 500.0},
        {"rope_scaling": {"type": "default"}, "rope_theta": 900.0},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}, "rope_scaling": {"rope_type": "default"}},
    ]
    for extra in cases:
        config = {**base, **extra}
        expected = transformers.LlamaConfig(**json.loads(json.dumps(config))).rope_parameters["rope_theta"]
        assert model_config_from_hf(config, "c").rope_theta == expected, extra
    scaled = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}
    for extra in (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": scaled},
        {"rope_parameters": scaled},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
    ):
        with pytest.raises(ValueError, match="rope type .* flaxpod supports only rope_type default"):
            model_config_from_hf({**base, **extra}, "c")
    assert model_config_from_hf({**base, "hidden_act": "swish"}, "c").family == "llama"
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        model_config_from_hf({**base, "hidden_act": "gelu"}, "c")
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_head": 4, "n_layer": 1}
    for act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate"):
        assert model_config_from_hf({**gpt2, "activation_function": act}, "c").family == "gpt2"
    with pytest.raises(ValueError, match="activation_function 'gelu'"):
        model_config_from_hf({**gpt2, "activation_function": "gelu"}, "c")


@pytest.mark.slow
def test_llama_with_byte_level_bpe_import_train_export_round_trip(bpe, tmp_path):
    """A directory written by transformers' save_pretrained (LlamaForCausalLM + byte-level BPE)
    -> `flaxpod import-hf` -> 20 steps of training on text -> `flaxpod export` -> transformers:
    same ids, logits equal to flaxpod's to 1e-4.

    The training is `flaxpod finetune` with task sft, an empty prompt and the text as the response,
    so the loss covers every text token: continued pretraining on text. (`pretrain` cannot resume
    from a params-only import-hf checkpoint; finetune is how a run starts from imported weights.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from flaxpod.train.run_dir import load_run, single_device_mesh

    from tests.helpers import run_cli, write_corpus

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=bpe.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        hidden_act="swish",
        eos_token_id=bpe.eos_id,
        pad_token_id=bpe.pad_id,
        bos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bpe.tokenizer_json()), eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(hf_dir)

    out = run_cli(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")], devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = write_corpus(tmp_path / "corpus.txt", 30_000).read_text().splitlines()
    with open(tmp_path / "text.jsonl", "w") as f:
        for i in range(0, len(lines), 4):
            f.write(json.dumps({"prompt": "", "response": "\n".join(lines[i : i + 4])}) + "\n")
    train = [
        "finetune",
        str(tmp_path / "run" / "config.yaml"),
        f"run_dir={tmp_path / 'ft'}",
        f"finetune.base={tmp_path / 'run'}",
        f"data.path={tmp_path / 'text.jsonl'}",
        "data.prompt_template='{prompt}'",
        "train.steps=20",
        "data.batch_size=8",
        "train.eval_every=10",
        "checkpoint.every=10",
    ]
    out = run_cli(train, devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step     20/20" in out.stdout
    out = run_cli(["export", str(tmp_path / "ft"), "--out", str(tmp_path / "export")], devices=1)
    assert out.returncode == 0, out.stderr[-2000:]

    run = load_run(tmp_path / "ft", mesh=single_device_mesh())
    assert run.step == 20 and run.tokenizer.kind == "huggingface"
    assert run.tokenizer.fingerprint() == bpe.fingerprint()
    exported_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = HARD_TEXT[:120]
    ids = run.tokenizer.encode_for_model(text)
    assert ids == exported_tok(text)["input_ids"] == fast(text)["input_ids"]
    ours = np.asarray(jax.jit(lambda p, x: nnx.merge(run.graphdef, p)(x))(run.params, jnp.asarray([ids])))[0]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        theirs = back(torch.tensor([ids])).logits[0].numpy()
        before = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(ours - before).max() > 1e-2  # the 20 steps changed the model


@pytest.mark.parametrize("kind", ["huggingface", "sentencepiece"])
def test_streaming_decode_never_splits_a_character(kind, bpe):
    tok = bpe if kind == "huggingface" else train_sentencepiece(TRAIN_TEXTS, 380)
    text = " Grüße 😀👍🏽 ᚠᛇᚻ naïve"
    ids = tok.encode(text)
    assert len(tok.encode("ᚠᛇᚻ")) == 9  # unseen characters: one byte token per UTF-8 byte
    pieces = list(tok.decode_stream(tok.encode("x"), ids))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # Stopped inside the last character (ᚻ is 3 bytes, so 3 byte tokens): it is not shown.
    cut = "".join(tok.decode_stream([], tok.encode("ᚠᛇᚻ")[:-1]))
    assert cut == "ᚠᛇ"
