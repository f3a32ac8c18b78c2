"""`flaxpod export RUN_DIR --out DIR [--format hf|safetensors] [--dtype ...] [--step N]`.

`hf`: a directory that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads offline:
config.json (LlamaForCausalLM or GPT2LMHeadModel), generation_config.json, the weights as
safetensors (sharded with an index past --max-shard-size) and the tokenizer files.
`safetensors`: our own parameter tree, names like `blocks/attn/q`, in one model.safetensors,
with the run's config.yaml and tokenizer beside it.

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

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DEFAULT_SHARD_BYTES = 5 * 1024**3


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise ValueError(f"--max-shard-size: expected a size such as 5GB or 500MB, got {text!r}")


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


def export_hf(
    params: dict, cfg, tokenizer, out: Path, *, dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[str]:
    """Writes a Hugging Face model directory for host (numpy) `params`; returns the files written."""
    from flaxpod.data.hf_tokenizer import write_hf_tokenizer
    from flaxpod.model.hf_weights import check_exportable, hf_config, to_hf

    m = cfg.model
    check_exportable(m)
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, more than model.vocab_size={m.vocab_size}")
    _prepare_out(out)
    tensors = {k: v.astype(DTYPES[dtype]) for k, v in to_hf(params, m).items()}
    eos, bos, pad = tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id
    config = hf_config(m, bos_id=bos, eos_id=eos, pad_id=pad, dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    files = ["config.json", "generation_config.json"]
    files += save_safetensors(tensors, out, max_shard_bytes)
    files += write_hf_tokenizer(tokenizer, out, m.max_seq_len or m.seq_len)
    return files


def export_plain(params: dict, run_dir: Path, out: Path, *, dtype: str = "float32") -> list[str]:
    """Our parameter tree as one safetensors file, with the run's config and tokenizer."""
    from flaxpod.model.hf_weights import flatten
    from safetensors.numpy import save_file

    _prepare_out(out)
    tensors = {k: v.astype(DTYPES[dtype]) for k, v in flatten(params).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "flaxpod"})
    shutil.copy(run_dir / "config.yaml", out / "config.yaml")
    shutil.copytree(run_dir / "tokenizer", out / "tokenizer")
    return ["model.safetensors", "config.yaml", "tokenizer/"]


def run_export(
    run_dir: str | Path,
    out: str | Path,
    *,
    fmt: str = "hf",
    dtype: str = "float32",
    step: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Restores a run's parameters (latest or `step`) and exports them."""
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
    if fmt == "hf":
        files = export_hf(params, run.cfg, run.tokenizer, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
    else:
        files = export_plain(params, Path(run_dir), out, dtype=dtype)
    print(f"exported step {run.step} of {run_dir} ({run.cfg.model.family}, {dtype}) to {out}: {', '.join(files)}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxpod export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", help="run directory (config.yaml, tokenizer/, checkpoints/)")
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    parser.add_argument("--format", default="hf", choices=["hf", "safetensors"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB (hf format)")
    args = parser.parse_args(argv)

    from flaxpod.train.cli import run_guarded

    return run_guarded(
        lambda: run_export(
            args.run_dir,
            args.out,
            fmt=args.format,
            dtype=args.dtype,
            step=args.step,
            max_shard_bytes=parse_size(args.max_shard_size),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
