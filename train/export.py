"""`flaxpod export RUN_DIR --out DIR [--format hf|safetensors] [--dtype ...] [--step N]`.

`hf`: a directory that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads offline:
config.json (LlamaForCausalLM or GPT2LMHeadModel), generation_config.json, the weights as
safetensors (sharded with an index past --max-shard-size) and the tokenizer files.
`safetensors`: our own parameter tree, names like `blocks/attn/q`, in one model.safetensors,
with the run's config.yaml and tokenizer beside it.

A LoRA run is exported merged (each adapter folded into its base weight, W + alpha/r A B); with
`--adapters-only` as a PEFT adapter directory instead (train/peft_export.py).

The parameters are restored onto this process's first device from a checkpoint written on any
mesh by any number of processes. Run it as a single process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from flaxpod.data.classify import LABELS_FILE, load_labels
from flaxpod.data.prepare import parse_size
from flaxpod.model.errors import InputError
from flaxpod.model.lora import merge

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DEFAULT_SHARD_BYTES = 5 * 1024**3


def save_safetensors(tensors: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers expects this tag on safetensors files
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=metadata)
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [*names, "model.safetensors.index.json"]


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: directory exists and is not empty; choose a new one")
    out.mkdir(parents=True, exist_ok=True)


SEQUENCE_CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}


def classifier_head(tensors: dict, config: dict, params: dict, cfg, labels: list[str]) -> None:
    """Turns a causal-LM export into Hugging Face's ...ForSequenceClassification: `score.weight` is our
    bias-free head, and transformers pools the last non-padding token as `model.pooling=last` does
    (our rows append EOS before pooling when the tokenizer has one: feed transformers the same ids)."""
    if cfg.model.pooling != "last":
        raise ValueError(
            f"model.pooling={cfg.model.pooling!r}: transformers' sequence classifiers pool the last token; "
            f"export this run with --format safetensors"
        )
    tensors.pop("lm_head.weight", None)
    tensors["score.weight"] = np.ascontiguousarray(np.asarray(params["cls_head"], np.float32).T)
    config["architectures"] = [SEQUENCE_CLASSIFIERS[cfg.model.family]]
    config["id2label"] = dict(enumerate(labels))
    config["label2id"] = {label: i for i, label in enumerate(labels)}


def export_hf(
    params: dict,
    cfg,
    tokenizer,
    out: Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    labels: list[str] | None = None,
) -> list[str]:
    """Writes a Hugging Face model directory for host (numpy) `params` (a classification run, with its
    `labels`, as ...ForSequenceClassification); returns the files written."""
    from flaxpod.data.hf_tokenizer import write_hf_tokenizer
    from flaxpod.model.hf_weights import check_exportable, hf_config, to_hf

    m = cfg.model
    check_exportable(m)
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, more than model.vocab_size={m.vocab_size}")
    _prepare_out(out)
    tensors = to_hf(params, m)
    eos, bos, pad = tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id
    config = hf_config(m, bos_id=bos, eos_id=eos, pad_id=pad, dtype=dtype)
    if m.bidirectional:
        from flaxpod.train.mlm import mask_token_id

        if m.num_labels:
            raise ValueError("a bidirectional classifier has no exact transformers class: use --format safetensors")
        config["mask_token_id"] = mask_token_id(tokenizer)
    if m.num_labels:
        classifier_head(tensors, config, params, cfg, labels or [str(i) for i in range(m.num_labels)])
    tensors = {k: v.astype(DTYPES[dtype]) for k, v in tensors.items()}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    files = ["config.json", "generation_config.json"]
    files += save_safetensors(tensors, out, max_shard_bytes)
    files += write_hf_tokenizer(tokenizer, out, m.max_len)
    return files


def export_plain(params: dict, run_dir: Path, out: Path, *, dtype: str = "float32", cfg=None) -> list[str]:
    """Our parameter tree as one safetensors file, with the run's config (or `cfg`, a merged LoRA run's) and
    tokenizer."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    _prepare_out(out)
    flat = flatten_dict(params, sep="/")  # names like blocks/attn/q
    tensors = {k: np.ascontiguousarray(np.asarray(v).astype(DTYPES[dtype])) for k, v in flat.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "flaxpod"})
    if cfg is None:
        shutil.copy(run_dir / "config.yaml", out / "config.yaml")
    else:
        from flaxpod.train.config import save_config

        save_config(cfg, out / "config.yaml")
    shutil.copytree(run_dir / "tokenizer", out / "tokenizer")
    files = ["model.safetensors", "config.yaml", "tokenizer/"]
    if (run_dir / LABELS_FILE).is_file():  # a classification run: the head's classes, in order
        shutil.copy(run_dir / LABELS_FILE, out / LABELS_FILE)
        files.append(LABELS_FILE)
    return files


def run_export(
    run_dir: str | Path,
    out: str | Path,
    *,
    fmt: str = "hf",
    dtype: str = "float32",
    step: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    adapters_only: bool = False,
) -> list[str]:
    """Restores a run's parameters (latest or `step`) and exports them (a LoRA run merged, or its adapters)."""
    from flaxpod.train.run_dir import host_params, load_run, single_device_mesh

    if fmt not in ("hf", "safetensors"):
        raise ValueError(f"--format: expected hf or safetensors, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    from flaxpod.train.cli import check_option

    check_option("--step", step, minimum=0)
    check_option("--max-shard-size", max_shard_bytes, minimum=1)
    run = load_run(run_dir, step, mesh=single_device_mesh())
    params = host_params(run.params)
    out = Path(out)
    cfg, merged = run.cfg, None
    if adapters_only:
        if not cfg.model.lora.rank:
            raise InputError(f"--adapters-only: {run_dir} is not a LoRA run (finetune.lora.rank is 0)")
        from flaxpod.train.lora_run import check_base
        from flaxpod.train.peft_export import export_adapters

        base = check_base(Path(run_dir), cfg)["run_dir"]
        _prepare_out(out)
        files = export_adapters(params, cfg, out, base)
        print(f"exported the LoRA adapters of step {run.step} of {run_dir} (base {base}) to {out}: {', '.join(files)}")
        return files
    if cfg.model.lora.rank:
        params, cfg = merge(params, cfg.model.lora), without_lora(cfg)
        merged = cfg
    if fmt == "hf":
        labels = load_labels(Path(run_dir) / LABELS_FILE) if run.cfg.model.num_labels else None
        files = export_hf(params, cfg, run.tokenizer, out, dtype=dtype, max_shard_bytes=max_shard_bytes, labels=labels)
    else:
        files = export_plain(params, Path(run_dir), out, dtype=dtype, cfg=merged)
    print(f"exported step {run.step} of {run_dir} ({run.cfg.model.family}, {dtype}) to {out}: {', '.join(files)}")
    return files


def without_lora(cfg):
    """A merged LoRA run's config: the plain model (no adapters)."""
    import dataclasses

    from flaxpod.model.config import LoraConfig

    model = dataclasses.replace(cfg.model, lora=LoraConfig())
    return dataclasses.replace(cfg, model=model, finetune=dataclasses.replace(cfg.finetune, lora=LoraConfig()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxpod export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", help="run directory (config.yaml, tokenizer/, checkpoints/)")
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    parser.add_argument("--format", default="hf", choices=["hf", "safetensors"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    shard_help = "largest safetensors file, e.g. 5GB (hf format)"
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES, help=shard_help)
    parser.add_argument(
        "--adapters-only", action="store_true", help="a LoRA run: write a PEFT adapter directory, not merged weights"
    )
    args = parser.parse_args(argv)

    from flaxpod.train.cli import run_guarded

    options = {"fmt": args.format, "dtype": args.dtype, "step": args.step, "max_shard_bytes": args.max_shard_size}
    options["adapters_only"] = args.adapters_only
    return run_guarded(lambda: run_export(args.run_dir, args.out, **options))


if __name__ == "__main__":
    sys.exit(main())
