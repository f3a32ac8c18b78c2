"""Reading a finished (or running) run directory: the one place evaluation, generation, export and
finetuning get a run's config, tokenizer and checkpointed parameters from.

They need only the parameters, so they restore the `params` item of a checkpoint and nothing else:
a checkpoint written by training (params, optimizer state, step, RNG) and a params-only one written
by `flaxpod import-hf` are read the same way. Orbax reshards on restore, so a checkpoint written by
several processes on any mesh is read onto whatever mesh (or single device) the caller asks for.
Every "no usable step" is a CheckpointError.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flaxpod.data.tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from flaxpod.model.errors import InputError
from flaxpod.sharding.mesh import build_mesh, param_shardings
from flaxpod.sharding.rules import make_rules
from flaxpod.train.checkpoint import make_run_info
from flaxpod.train.checkpoint_files import (
    PARAMS,
    RUN,
    CheckpointError,
    abstract,
    checkpoints_dir,
    committed_steps,
    reader,
    step_dirs,
    usable_steps,
    warn,
    write_commit,
)
from flaxpod.train.config import Config, ConfigError, config_from_dict, load_config, resolve_mesh_shape, save_config
from flaxpod.train.config import to_dict as config_to_dict
from flaxpod.train.early_stopping import read_best
from flaxpod.train.state import StateLayout, abstract_model
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"


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


# ---------------------------------------------------------------------------------------------
# Config and tokenizer


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved by training (model.vocab_size and max_seq_len filled in)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run directory {run_dir} does not exist")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
    cfg = load_config(path)
    if cfg.model.vocab_size <= 0:
        raise InputError(f"{path}: model.vocab_size is not resolved (got {cfg.model.vocab_size}); not a run's config")
    return cfg


def check_tokenizer(tokenizer: Tokenizer, cfg: Config, where: str | Path) -> None:
    """A tokenizer whose ids do not fit the embedding cannot belong to this model."""
    if tokenizer.kind != cfg.tokenizer.kind:
        raise InputError(
            f"{where}: holds a {tokenizer.kind!r} tokenizer but the run's config says tokenizer.kind="
            f"{cfg.tokenizer.kind!r}"
        )
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise InputError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's embedding has only "
            f"model.vocab_size={cfg.model.vocab_size} rows; it is not this model's tokenizer"
        )


def load_run_tokenizer(run_dir: str | Path, cfg: Config) -> Tokenizer:
    directory = Path(run_dir) / TOKENIZER_DIR
    if not has_tokenizer(directory):
        raise InputError(f"{run_dir} has no tokenizer (expected tokenizer/tokenizer.json or tokenizer.model)")
    tokenizer = load_tokenizer(directory)
    check_tokenizer(tokenizer, cfg, directory)
    return tokenizer


Read = TypeVar("Read")


def restore_newest(run_dir: str | Path, step: int | None, read: Callable[[Any], Read]) -> tuple[Read, int]:
    """(read(step_dir), step) of `step`, or of the newest step that restores, for every reader.

    Steps failing their checks are skipped with a warning (`usable_steps`); so is a step whose
    restore fails (damage its commit record cannot show, e.g. a record from before content hashes),
    naming the step. An explicit step that fails is a CheckpointError saying it is damaged."""
    directory = checkpoints_dir(run_dir)
    failures = []
    for s, step_dir in usable_steps(run_dir, step):
        try:
            return read(step_dir), s
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax and its codecs raise many types for damaged data
            problem = f"restore failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
            if step is not None:
                raise CheckpointError(f"checkpoint step {s} in {directory} is damaged: {problem}") from None
            warn(f"checkpoint step {s} in {directory} is unusable: {problem}; trying an older step")
            failures.append(f"step {s}: {problem}")
    listing = f" ({'; '.join(failures)}); if {CONFIG_FILE} was edited, it may no longer match them" if failures else ""
    raise CheckpointError(f"no usable checkpoint in {directory}{listing}")


def _read_run_item(step_dir: Any) -> dict[str, Any]:
    with reader() as handle:
        return handle.restore(step_dir, args=ocp.args.Composite(**{RUN: ocp.args.JsonRestore()}))[RUN]


def read_run_info(run_dir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, run item) of a checkpoint: {'config': resolved config dict, 'tokenizer': {...}}."""
    info, step = restore_newest(run_dir, step, _read_run_item)
    return step, info


def tokenizer_from_run_info(run_info: dict[str, Any]) -> Tokenizer:
    """The tokenizer stored in a checkpoint's run item. Its file name comes from the checkpoint,
    so it is checked to be a plain file name before anything is written under it."""
    tok = run_info["tokenizer"]
    name = tok.get("filename")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise InputError(f"checkpoint run item: tokenizer filename {name!r} is not a plain file name")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, name).write_bytes(base64.b64decode(tok["base64"]))
        return load_tokenizer(tmp)


# ---------------------------------------------------------------------------------------------
# Parameters


def default_mesh(cfg: Config) -> Mesh:
    """All devices, laid out as the run's mesh config asks when the device count allows it,
    else as one data-parallel axis (parameters replicated)."""
    try:
        shape = resolve_mesh_shape(cfg.mesh, jax.device_count())
    except ConfigError:
        shape = (jax.device_count(), 1, 1)
    return build_mesh(*shape)


def single_device_mesh() -> Mesh:
    return build_mesh(1, 1, 1, devices=jax.devices()[:1])


def param_target(cfg: Config, mesh: Mesh | None) -> dict:
    """Abstract parameters of cfg's model, sharded over `mesh` by cfg's rules (None: whole on the
    first device)."""
    _, model = abstract_model(cfg.model)
    shapes = nnx.to_pure_dict(model)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = param_shardings(model, mesh, make_rules(cfg.mesh.rules, cfg.mesh.rule_overrides))
    return abstract(shapes, shardings)


def _is_abstract_tree(target: Any) -> bool:
    leaves = jax.tree.leaves(target) if target is not None and not isinstance(target, Mesh) else []
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def restore_params(
    run_dir: str | Path,
    step: int | None = None,
    target: StateLayout | Mesh | Any | None = None,
) -> tuple[dict, int]:
    """Reads only the parameters of a checkpoint (no optimizer state). Returns (params, step).

    step: a step number, or None for the newest usable checkpoint (newer unusable ones are skipped
        with a warning); an explicit step that is missing or unusable raises CheckpointError.
    target: where the arrays go. A StateLayout: its parameter shardings. A Mesh: the shardings
        the checkpoint's own config (mesh.rules, mesh.rule_overrides) gives on that mesh. A tree
        of jax.ShapeDtypeStruct with shardings: exactly those. None: every array whole on the first
        device. Any mesh or device count works: the arrays are resharded as they are read.
    """
    if isinstance(target, StateLayout):
        target = abstract(target.shapes.params, target.param_shardings)
    elif not _is_abstract_tree(target) and target is not None and not isinstance(target, Mesh):
        raise TypeError(
            f"restore_params: target must be a StateLayout, a Mesh, a tree of jax.ShapeDtypeStruct or None, "
            f"got {type(target).__name__}"
        )

    def read(step_dir: Any) -> dict:
        step_target = target
        if not _is_abstract_tree(target):  # a Mesh or None: the shapes come from the step's own config
            if not (step_dir / RUN).exists():
                raise CheckpointError(f"{step_dir}: has no run item (config); pass a StateLayout or abstract target")
            step_target = param_target(config_from_dict(_read_run_item(step_dir)["config"]), target)
        with reader() as handle:
            out = handle.restore(step_dir, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(step_target)}))
        return out[PARAMS]

    return restore_newest(run_dir, step, read)


def load_run(run_dir: str | Path, step: int | None = None, mesh: Mesh | None = None) -> LoadedRun:
    """Config, tokenizer and parameters of a run directory, checked against each other. `step`
    defaults to the run's best step (early stopping, RUN_DIR/best.json), else its newest usable one;
    `mesh` defaults to `default_mesh` of the run's config."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if step is None and (best := read_best(run_dir)) is not None:
        step = best.step
    tokenizer = load_run_tokenizer(run_dir, cfg)
    mesh = mesh if mesh is not None else default_mesh(cfg)
    params, step = restore_params(run_dir, step, param_target(cfg, mesh))
    graphdef, _ = abstract_model(cfg.model)
    return LoadedRun(run_dir, cfg, tokenizer, graphdef, params, step, mesh)


def host_params(params: dict) -> dict:
    """Parameters as numpy arrays on this host (gathered from every process's shards)."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(np.asarray, params)


# ---------------------------------------------------------------------------------------------
# Params-only runs (weights imported from elsewhere)


def save_params(run_dir: str | Path, step: int, params: dict, run_info: dict[str, Any] | None = None) -> Path:
    """Writes a committed params-only checkpoint RUN_DIR/checkpoints/<step> (no optimizer state):
    for weights imported from elsewhere, which evaluation, generation, export and finetuning then
    read like any checkpoint (`restore_params`). Training cannot resume from it. Returns its path."""
    directory = checkpoints_dir(run_dir)
    if step in step_dirs(directory):
        raise CheckpointError(f"checkpoint step {step} already exists in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    args: dict[str, Any] = {PARAMS: ocp.args.StandardSave(params)}
    if run_info is not None:
        args[RUN] = ocp.args.JsonSave(run_info)
    step_dir = directory / str(step)
    writer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        writer.save(step_dir, args=ocp.args.Composite(**args))
    finally:
        writer.close()
    if jax.process_index() == 0:
        write_commit(step_dir, step)
    return Path(str(step_dir))


def write_params_run(run_dir: str | Path, cfg: Config, tokenizer: Tokenizer, params: dict, step: int = 0) -> Path:
    """A run directory holding only parameters (no optimizer state): config.yaml, tokenizer/
    and checkpoints/<step>/params. Evaluation, generation, export and finetuning read it like a
    training run's. Refuses to write into an existing run directory."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).exists() or committed_steps(run_dir):
        raise InputError(f"{run_dir} already holds a run; choose a new output directory")
    check_tokenizer(tokenizer, cfg, "tokenizer")
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / TOKENIZER_DIR)
    device = NamedSharding(single_device_mesh(), PartitionSpec())
    params = jax.tree.map(lambda a: jax.device_put(np.asarray(a, np.float32), device), params)
    save_params(run_dir, step, params, make_run_info(config_to_dict(cfg), tokenizer))
    save_config(cfg, run_dir / CONFIG_FILE)
    return run_dir
