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


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors or of the shards an index names; pickles refused."""
    from safetensors.numpy import load_file

    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
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


def import_hf(hf_dir: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Writes a params-only run directory for a Hugging Face model directory; returns it."""
    from flaxpod.data.hf_tokenizer import read_hf_tokenizer
    from flaxpod.data.tokenizer import load_tokenizer
    from flaxpod.model.hf_weights import drop_zero_biases, from_hf, model_config_from_hf
    from flaxpod.train.config import Config, TokenizerConfig, TrainConfig
    from flaxpod.train.run_dir import write_params_run

    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from None
    model_cfg = model_config_from_hf(hf_cfg, str(config_path))
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
    cfg = Config(run_dir=str(out), model=model_cfg, tokenizer=tok_cfg, train=train)
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
