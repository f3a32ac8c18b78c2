"""Reading a finished (or running) run directory: its config, tokenizer and checkpointed parameters.

Evaluation, generation and export only need the parameters, so they restore the `params`
subtree of a checkpoint's `state` item and nothing else: a checkpoint written by training
(params, optimizer state, step, RNG) and a params-only one written by `flaxpod import-hf` are
read the same way. Orbax reshards on restore, so a checkpoint written by several processes on
any mesh is read onto whatever mesh (or single device) the caller asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from flaxpod.data.tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from flaxpod.sharding.mesh import build_mesh, param_shardings
from flaxpod.sharding.rules import make_rules
from flaxpod.train import checkpoint
from flaxpod.train.checkpoint import committed_steps
from flaxpod.train.config import Config, load_config, save_config, to_dict
from flaxpod.train.state import abstract_model
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class LoadedRun:
    """A run's model, ready to call: `nnx.merge(graphdef, params)` is the Transformer."""

    run_dir: Path
    cfg: Config
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    params: dict
    step: int
    mesh: Mesh


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved by training (model.vocab_size and max_seq_len filled in)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
    cfg = load_config(path)
    if cfg.model.vocab_size <= 0:
        raise ValueError(f"{path}: model.vocab_size is not resolved (got {cfg.model.vocab_size}); not a run's config")
    return cfg


def resolve_step(run_dir: str | Path, step: int | None) -> int:
    """`step`, checked to exist, or the latest complete checkpoint's step."""
    steps = committed_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no checkpoints (expected {Path(run_dir) / CHECKPOINT_DIR}/<step>/)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"--step {step}: no checkpoint of that step in {run_dir}; available steps: {steps}")
    return step


def check_tokenizer(tokenizer: Tokenizer, cfg: Config, where: str | Path) -> None:
    """A tokenizer whose ids do not fit the embedding cannot belong to this model."""
    if tokenizer.kind != cfg.tokenizer.kind:
        raise ValueError(
            f"{where}: holds a {tokenizer.kind!r} tokenizer but the run's config says tokenizer.kind="
            f"{cfg.tokenizer.kind!r}"
        )
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's embedding has only "
            f"model.vocab_size={cfg.model.vocab_size} rows; it is not this model's tokenizer"
        )


def load_run_tokenizer(run_dir: str | Path, cfg: Config) -> Tokenizer:
    directory = Path(run_dir) / "tokenizer"
    if not has_tokenizer(directory):
        raise FileNotFoundError(f"{run_dir} has no tokenizer (expected tokenizer/tokenizer.json or tokenizer.model)")
    tokenizer = load_tokenizer(directory)
    check_tokenizer(tokenizer, cfg, directory)
    return tokenizer


def default_mesh(cfg: Config) -> Mesh:
    """All devices, laid out as the run's mesh config asks when the device count allows it,
    else as one data-parallel axis (parameters replicated)."""
    from flaxpod.train.config import ConfigError, resolve_mesh_shape

    try:
        shape = resolve_mesh_shape(cfg.mesh, jax.device_count())
    except ConfigError:
        shape = (jax.device_count(), 1, 1)
    return build_mesh(*shape)


def single_device_mesh() -> Mesh:
    return build_mesh(1, 1, 1, devices=jax.devices()[:1])


def restore_params(
    run_dir: str | Path, cfg: Config, step: int | None = None, mesh: Mesh | None = None
) -> tuple[dict, int]:
    """(params, step): the parameters of checkpoint `step` (default: the latest), sharded over
    `mesh` by the run's logical-axis rules (default mesh: see `default_mesh`)."""
    run_dir = Path(run_dir)
    step = resolve_step(run_dir, step)
    mesh = mesh if mesh is not None else default_mesh(cfg)
    _, abstract = abstract_model(cfg.model)
    shardings = param_shardings(abstract, mesh, make_rules(cfg.mesh.rules, cfg.mesh.rule_overrides))
    shapes = nnx.to_pure_dict(abstract)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    try:
        return checkpoint.restore_params(run_dir, step, target)[0], step
    except (ValueError, KeyError) as e:
        raise ValueError(f"{run_dir} step {step}: its parameters do not match the model in config.yaml: {e}") from None


def load_run(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None) -> LoadedRun:
    """Config, tokenizer and parameters of a run directory, checked against each other."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    tokenizer = load_run_tokenizer(run_dir, cfg)
    mesh = mesh if mesh is not None else default_mesh(cfg)
    params, step = restore_params(run_dir, cfg, step, mesh)
    graphdef, _ = abstract_model(cfg.model)
    return LoadedRun(run_dir, cfg, tokenizer, graphdef, params, step, mesh)


def host_params(params: dict) -> dict:
    """Parameters as numpy arrays on this host (gathered from every process's shards)."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(np.asarray, params)


def write_params_run(run_dir: str | Path, cfg: Config, tokenizer: Tokenizer, params: dict, step: int = 0) -> Path:
    """A run directory holding only parameters (no optimizer state): config.yaml, tokenizer/
    and checkpoints/<step>/state = {"params": ...}. Evaluation, generation and export read it
    like a training run's. Refuses to write into an existing run directory."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).exists() or committed_steps(run_dir):
        raise ValueError(f"{run_dir} already holds a run; choose a new output directory")
    check_tokenizer(tokenizer, cfg, "tokenizer")
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / "tokenizer")
    device = NamedSharding(single_device_mesh(), PartitionSpec())
    params = jax.tree.map(lambda a: jax.device_put(np.asarray(a, np.float32), device), params)
    checkpoint.save_params(run_dir, step, params, checkpoint.make_run_info(to_dict(cfg), tokenizer))
    save_config(cfg, run_dir / CONFIG_FILE)
    return run_dir
