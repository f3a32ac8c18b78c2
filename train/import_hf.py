"""`flaxpod import-hf HF_DIR --out RUN_DIR [--tokenizer DIR]`: a Hugging Face GPT-2 or Llama
directory -> a flaxpod run directory (config.yaml, tokenizer/, checkpoints/0/state with params).

Only safetensors are read: a `.bin` checkpoint is a pickle, which can run code when loaded, and
is refused. The tokenizer is read from the directory as transformers reads it: its tokenizer.json
(byte-level BPE, WordPiece, Unigram: through the `tokenizers` library, special tokens from
tokenizer_config.json), or flaxpod's own SentencePiece `tokenizer.model`; `--tokenizer PATH`
names another one with the same ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from flaxpod.model.errors import InputError


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors or of the shards an index names; pickles refused."""
    from safetensors.numpy import load_file

    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        files = _index_shards(index)
    elif single.is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
        if pickles:
            raise ValueError(
                f"{hf_dir}: holds only {pickles[0]}, a pickle; flaxpod never loads pickles. Convert it to "
                "safetensors first (e.g. model.save_pretrained(dir, safe_serialization=True) in a trusted environment)"
            )
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{index}: names {name}, which does not exist")
        try:
            loaded = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
        tensors.update({k: np.asarray(v, np.float32) for k, v in loaded.items()})
    return tensors


def _index_shards(index: Path) -> list[str]:
    """The shard files an index names, each a file name inside the model directory: a name from
    the file is never followed out of it ('../x', '/abs/x')."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError) as e:
        raise InputError(f"{index}: not a JSON object with a weight_map ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: 'weight_map' must be a non-empty mapping of tensor name -> shard file")
    root = index.parent.resolve()
    for name in weight_map.values():
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputError(f"{index}: shard {name!r} is not a file name inside {index.parent}")
        if not (root / name).resolve().is_relative_to(root):
            raise InputError(f"{index}: shard {name!r} leads out of {index.parent}")
    return sorted(set(weight_map.values()))


# Sizes in config.json (GPT-2 and Llama names); absent or null ones take the converter's defaults.
SIZE_KEYS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
    "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_head", "n_layer", "n_positions", "n_inner",
)  # fmt: skip


def _model_config(config_path: Path):
    """ModelConfig of a config.json; anything malformed in it is one InputError naming the file."""
    from flaxpod.model.hf_weights import model_config_from_hf

    try:
        hf_cfg = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path}: not valid JSON: {e}") from None
    if not isinstance(hf_cfg, dict):
        raise InputError(f"{config_path}: expected a JSON object, got {type(hf_cfg).__name__}")
    for key in SIZE_KEYS:
        value = hf_cfg.get(key)
        if key in hf_cfg and value is not None and (type(value) is not int or value <= 0):
            raise InputError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    try:
        return model_config_from_hf(hf_cfg, str(config_path))
    except InputError:
        raise
    except KeyError as e:
        raise InputError(f"{config_path}: missing key {e}") from None
    except ValueError as e:  # the converter's own messages already name the file
        raise InputError(str(e) if str(e).startswith(str(config_path)) else f"{config_path}: {e}") from None
    except (TypeError, ZeroDivisionError, AttributeError) as e:
        raise InputError(f"{config_path}: unusable value ({type(e).__name__}: {e})") from None


def import_hf(hf_dir: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Writes a params-only run directory for a Hugging Face model directory; returns it."""
    from flaxpod.data.hf_tokenizer import read_hf_tokenizer
    from flaxpod.data.tokenizer import load_tokenizer
    from flaxpod.model.hf_weights import drop_zero_biases, from_hf
    from flaxpod.train.config import Config, ConfigError, TokenizerConfig, TrainConfig
    from flaxpod.train.run_dir import write_params_run

    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # like export: never write into existing files
        raise InputError(f"--out {out}: exists and is not an empty directory; choose a new one")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    model_cfg = _model_config(config_path)
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = read_hf_tokenizer(hf_dir)
        if tokenizer is None:
            raise ValueError(
                f"{hf_dir}: no tokenizer flaxpod can read (no tokenizer.json or tokenizer.model); "
                "pass --tokenizer PATH with a tokenizer that has the same ids"
            )
    params = from_hf(read_safetensors(hf_dir), model_cfg, str(hf_dir))
    params, model_cfg = drop_zero_biases(params, model_cfg)
    tok_cfg = TokenizerConfig(kind=tokenizer.kind, vocab_size=tokenizer.vocab_size if tokenizer.vocab_size > 0 else 1)
    train = TrainConfig(objective="mlm" if model_cfg.bidirectional else "causal")  # an encoder resumes as one
    try:
        cfg = Config(run_dir=str(out), model=model_cfg, tokenizer=tok_cfg, train=train)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: gives an unusable model: {e}") from None
    return write_params_run(out, cfg, tokenizer, params, step=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxpod import-hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="new run directory to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or file to use instead of HF_DIR's")
    args = parser.parse_args(argv)

    from flaxpod.train.cli import run_guarded

    def job() -> None:
        run_dir = import_hf(args.hf_dir, args.out, args.tokenizer)
        print(f"imported {args.hf_dir} into {run_dir} (checkpoints/0 holds the parameters)")

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
