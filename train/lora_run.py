"""A LoRA run's checkpoints hold only what it trains (adapters, task head, `lora.train_fully` groups) and
refer to the base run for the frozen rest: RUN_DIR/lora_base.json names the base directory, its step and
a fingerprint of its params checkpoint (the commit record's file names, sizes and hashes). Resuming, evaluating
or exporting the run rebuilds the full parameters from the base and refuses a base that changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
from flaxpod.model.errors import InputError
from flaxpod.train.checkpoint import PartialParams
from flaxpod.train.checkpoint_files import COMMIT_FILE, PARAMS, find_checkpoint
from flaxpod.train.config import Config
from flaxpod.train.optimizer import trainable_mask

BASE_FILE = "lora_base.json"


def is_lora(cfg: Config) -> bool:
    return cfg.model.lora.rank > 0


def base_fingerprint(base_dir: str | Path, step: int) -> str:
    """sha256 of what the base checkpoint's commit record lists for its params files: their sizes, and
    their content hashes where the record has them (nothing is re-read: the record was written at commit)."""
    _, step_dir = find_checkpoint(base_dir, step)
    record = json.loads((step_dir / COMMIT_FILE).read_text())
    params = {
        key: {name: v for name, v in sorted(record.get(key, {}).items()) if name.startswith(PARAMS + "/")}
        for key in ("files", "sha256")
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def base_reference(cfg: Config) -> dict[str, Any]:
    base = str(Path(cfg.finetune.base).resolve())
    return {
        "run_dir": base,
        "step": cfg.finetune.base_step,
        "fingerprint": base_fingerprint(base, cfg.finetune.base_step),
    }


def record_base(run_dir: Path, cfg: Config) -> None:
    """Writes RUN_DIR/lora_base.json on a new run; on an existing one, checks the base is still the same."""
    path = run_dir / BASE_FILE
    if path.is_file():
        check_base(run_dir, cfg)
        return
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(base_reference(cfg), indent=2))
        tmp.replace(path)


def check_base(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """The run's recorded base reference, after checking that the base checkpoint is unchanged."""
    path = Path(run_dir) / BASE_FILE
    if not path.is_file():
        raise InputError(f"{run_dir}: a LoRA run without {BASE_FILE}; its base weights cannot be found")
    saved = json.loads(path.read_text())
    try:
        now = base_fingerprint(saved["run_dir"], saved["step"])
    except InputError as e:
        raise InputError(f"{path}: the base run is gone or unreadable ({e})") from None
    if now != saved["fingerprint"]:
        raise InputError(
            f"{path}: base {saved['run_dir']} step {saved['step']} changed since this LoRA run started "
            f"(params fingerprint {now[:12]} != {saved['fingerprint'][:12]}); its adapters belong to the old base"
        )
    return saved


def prune(tree: dict, mask: dict) -> dict:
    """The leaves of `tree` where `mask` is True, empty branches dropped."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = prune(value, mask[key])
            if sub:
                out[key] = sub
        elif mask[key]:
            out[key] = value
    return out


def overlay(base: dict, part: dict) -> dict:
    """`base` with `part`'s entries added or replacing, recursively."""
    out = dict(base)
    for key, value in part.items():
        out[key] = overlay(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def restricted(tree: dict, like: dict) -> dict:
    """`tree` limited to the keys `like` has, recursively (drops a base's own task head, say)."""
    return {k: restricted(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def saved_part(cfg: Config, params: dict) -> dict:
    """The part of a LoRA run's parameters (or a tree like them) that its checkpoints hold."""
    return prune(params, trainable_mask(params, cfg.finetune.freeze, cfg.model.lora))


def partial_params(cfg: Config, run_dir: str | Path, shapes: dict, shardings: dict, mesh) -> PartialParams:
    """How a LoRA run's checkpoints hold its parameters: the trained part; the rest read from the base
    (checked against its fingerprint) onto `shardings`."""
    from flaxpod.train.run_dir import load_run_config, param_target, restore_params

    def complete(part: dict) -> dict:
        ref = check_base(Path(run_dir), cfg)
        base_cfg = load_run_config(ref["run_dir"])
        base, _ = restore_params(ref["run_dir"], ref["step"], param_target(base_cfg, mesh))
        full = restricted(overlay(base, part), shapes)
        return jax.device_put(full, shardings)

    return PartialParams(select=lambda tree: saved_part(cfg, tree), complete=complete)
