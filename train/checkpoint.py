"""Checkpoints that never lose a run: complete or invisible, verified on restore, restorable on any mesh.

One checkpoint is one Orbax step, RUN_DIR/checkpoints/<step>/:

    params/          model parameters (Orbax PyTree)
    train_state/     the rest of the train state: optimizer state, step, RNG key, skipped-step count
    data/            every process's data-iterator state, process_<i>-of-<n>.json (a JSON-able dict each)
    run/             the resolved config and the tokenizer (JSON), so a checkpoint stands on its own
    flaxpod_commit.json   written last, once Orbax has finished: the size of every file above

Orbax writes a step under a temporary name and renames it when done; after that a background
thread writes the commit file. A step directory without a commit file is invisible (a save that
was cut short), and one whose files do not match their recorded sizes, or that fails to restore,
is skipped with a warning naming the step: resuming uses the newest usable one. Asking for a step
explicitly never falls back: an unusable step is an error.

A params-only checkpoint (`save_params`: imported weights) has just `params/` and `run/`.

Retention is ours, not Orbax's, so that only committed checkpoints count: the newest `keep`
plus, permanently, every step that is a multiple of `keep_every`.

The state is restored against abstract arrays carrying the current mesh's shardings, which
reshards a checkpoint written on another mesh or device count.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flaxpod.model.errors import FlaxpodError, InputError
from flaxpod.train.faults import EXIT_CHECKPOINT_WRITE
from flaxpod.train.state import StateLayout, TrainState
from jax.sharding import Mesh, SingleDeviceSharding

CHECKPOINTS = "checkpoints"
UNUSABLE = "checkpoints_unusable"  # where unusable steps are moved, next to CHECKPOINTS
COMMIT_FILE = "flaxpod_commit.json"
PARAMS, TRAIN_STATE, DATA, RUN = "params", "train_state", "data", "run"
REQUIRED_ITEMS = (PARAMS,)  # params-only checkpoints (save_params) have no train_state
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(InputError):
    """A checkpoint that was asked for is missing or unusable, or a run directory has none usable."""


class CheckpointWriteError(FlaxpodError, OSError):
    """Writing a checkpoint failed (disk full, run directory not writable); earlier ones are intact."""

    exit_code = EXIT_CHECKPOINT_WRITE


def warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Step directories, commit files and their checks


def checkpoints_dir(run_dir: str | Path) -> epath.Path:
    """RUN_DIR/checkpoints (absolute: Orbax requires it; URLs such as gs://... are kept as they are)."""
    text = str(run_dir)
    return epath.Path(text if "://" in text else os.path.abspath(text)) / CHECKPOINTS


def step_dirs(directory: epath.Path) -> dict[int, epath.Path]:
    """Step number -> directory, for every directory named by a number (Orbax's temporary
    `<step>.orbax-checkpoint-tmp*` directories are not steps)."""
    if not directory.exists():
        return {}
    return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def _files(root: epath.Path) -> dict[str, int]:
    """Relative path -> size of every file below root (without recursive globbing, which
    epath refuses on cloud storage)."""
    out: dict[str, int] = {}
    pending = [root]
    while pending:
        directory = pending.pop()
        for p in directory.iterdir():
            if p.is_dir():
                pending.append(p)
            elif p.name != COMMIT_FILE:
                out[str(p.relative_to(root))] = p.stat().length
    return out


def write_commit(step_dir: epath.Path, step: int) -> None:
    """Records every file's size, then renames the record into place: the step is committed."""
    record = {"step": step, "time": time.time(), "files": dict(sorted(_files(step_dir).items()))}
    tmp = step_dir / f".{COMMIT_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=0))
    tmp.replace(step_dir / COMMIT_FILE)


def check_step(step_dir: epath.Path) -> str | None:
    """What is wrong with a step directory, or None if it is a complete checkpoint."""
    commit = step_dir / COMMIT_FILE
    if not commit.exists():
        return f"no {COMMIT_FILE} (the save never completed)"
    try:
        files = json.loads(commit.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMMIT_FILE} ({e})"
    items = set(REQUIRED_ITEMS) | {name.split("/")[0] for name in files if "/" in name}
    for item in sorted(items):
        if not (step_dir / item).exists():
            return f"item '{item}' is missing"
    for name, size in files.items():
        path = step_dir / name
        if not path.exists():
            return f"file {name} is missing"
        actual = path.stat().length
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were written"
    return None


def committed_steps(run_dir: str | Path) -> list[int]:
    """Steps with a valid commit record, oldest first (no array is read)."""
    return sorted(s for s, d in step_dirs(checkpoints_dir(run_dir)).items() if check_step(d) is None)


def steps_to_delete(steps: list[int], keep: int, keep_every: int = 0) -> list[int]:
    """Committed steps outside the policy: not among the newest `keep`, and not a multiple of
    `keep_every` (those stay permanently)."""
    newest = set(sorted(steps)[-keep:]) if keep > 0 else set()
    return [s for s in sorted(steps) if s not in newest and not (keep_every and s % keep_every == 0)]


def _resolve_step(directory: epath.Path, step: int) -> epath.Path:
    """The directory of an explicitly requested step, which must be usable."""
    dirs = step_dirs(directory)
    if step not in dirs:
        available = sorted(s for s, d in dirs.items() if check_step(d) is None)
        raise CheckpointError(f"no checkpoint step {step} in {directory}; usable steps: {available or 'none'}")
    problem = check_step(dirs[step])
    if problem:
        raise CheckpointError(f"checkpoint step {step} in {directory} is unusable: {problem}")
    return dirs[step]


# ---------------------------------------------------------------------------------------------
# Items


class IteratorStateBox:
    """Holds a snapshot of a data iterator's state (a JSON-able dict) for Grain's Orbax handler.

    Saving the live iterator would let an asynchronous save read a later state than the step
    being saved; a snapshot taken at save time cannot drift. The handler writes one file per
    process. (It takes bytes from objects that are not Grain iterators.)
    """

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by the handler after restore
        pass


def make_run_info(config: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The `run` item: the resolved config and the tokenizer's file (base64)."""
    data = tokenizer.serialize()
    return {
        "config": config,
        "tokenizer": {
            "kind": tokenizer.kind,
            "filename": tokenizer.filename,
            "sha256": tokenizer.fingerprint(),
            "base64": base64.b64encode(data).decode("ascii"),
        },
    }


def _abstract(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _data_process_count(step_dir: epath.Path) -> int | None:
    data = step_dir / DATA
    if not data.exists():
        return None
    counts = {int(p.name.split("-of-")[1].split(".")[0]) for p in data.iterdir() if "-of-" in p.name}
    return counts.pop() if len(counts) == 1 else None


@contextlib.contextmanager
def _reader() -> Iterator[ocp.Checkpointer]:
    reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        yield reader
    finally:
        reader.close()


@dataclass
class Restored:
    step: int
    state: TrainState
    data_state: dict | None
    run_info: dict[str, Any]


def _restore(step_dir: epath.Path, layout: StateLayout) -> Restored:
    """Reads one step onto the layout's shardings (any mesh)."""
    if not (step_dir / TRAIN_STATE).exists():
        raise CheckpointError(
            f"{step_dir}: holds parameters only (no optimizer state) and cannot be resumed; train in a new "
            f"run_dir (to start from these weights, finetune from them)"
        )
    saved_processes = _data_process_count(step_dir)
    if saved_processes is not None and saved_processes != jax.process_count():
        raise CheckpointError(
            f"{step_dir}: holds the data-iterator state of {saved_processes} processes, this run has "
            f"{jax.process_count()}; resume with {saved_processes} processes (the data order depends on it)"
        )
    rest_shapes = {k: v for k, v in layout.shapes.items() if k != PARAMS}
    rest_shardings = {k: v for k, v in layout.shardings.items() if k != PARAMS}
    args: dict[str, Any] = {
        PARAMS: ocp.args.StandardRestore(_abstract(layout.shapes[PARAMS], layout.shardings[PARAMS])),
        TRAIN_STATE: ocp.args.StandardRestore(_abstract(rest_shapes, rest_shardings)),
        RUN: ocp.args.JsonRestore(),
    }
    if saved_processes is not None:
        args[DATA] = grain.checkpoint.CheckpointRestore(IteratorStateBox())
    with _reader() as reader:
        out = reader.restore(step_dir, args=ocp.args.Composite(**args))
    state = {PARAMS: out[PARAMS], **out[TRAIN_STATE]}
    data_state = out[DATA].state if saved_processes is not None else None
    return Restored(int(step_dir.name), state, data_state, out[RUN])


# ---------------------------------------------------------------------------------------------
# Writing and resuming a run


class Checkpointer:
    """Saves train steps of one run (asynchronously by default) and finds the step to resume from.

    `save` returns once the arrays are copied off the devices (training continues while a
    background thread writes them); the next `save`, `wait` or `close` raises
    CheckpointWriteError if that write failed.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        keep: int,
        keep_every: int = 0,
        async_save: bool = True,
        run_info: dict[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.directory = checkpoints_dir(run_dir)
        self.keep, self.keep_every, self.run_info = keep, keep_every, run_info or {}
        self.async_save = async_save
        self._writer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
        self._committer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending_step: int | None = None
        self.last_committed: int | None = None
        self.committed_at = 0.0  # time.perf_counter() when the last save was committed

    # -- saving

    def save(self, step: int, state: TrainState, data_state: dict | None, *, wait: bool = False) -> float:
        """Starts writing `step`; returns the seconds training was blocked. With `wait`, returns
        only once the step is committed."""
        start = time.perf_counter()
        self._finish_pending()
        if jax.process_index() == 0:
            self._prepare_directory()
        args: dict[str, Any] = {
            PARAMS: ocp.args.StandardSave(state[PARAMS]),
            TRAIN_STATE: ocp.args.StandardSave({k: v for k, v in state.items() if k != PARAMS}),
            RUN: ocp.args.JsonSave(self.run_info),
        }
        if data_state is not None:
            args[DATA] = grain.checkpoint.CheckpointSave(IteratorStateBox(data_state))
        try:
            self._writer.save(self.directory / str(step), args=ocp.args.Composite(**args), force=True)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._write_error(step, e) from e
        self._pending_step = step
        self._committer = threading.Thread(target=self._commit, args=(step,), name=f"commit-{step}", daemon=True)
        self._committer.start()
        if wait or not self.async_save:
            self._finish_pending()
        return time.perf_counter() - start

    def _prepare_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointWriteError(f"cannot create the checkpoint directory {self.directory}: {e}") from e

    def _commit(self, step: int) -> None:
        """Background: wait for Orbax, write the commit file, apply retention."""
        try:
            self._writer.wait_until_finished()
            if jax.process_index() == 0:
                write_commit(self.directory / str(step), step)
            self.committed_at = time.perf_counter()
            if jax.process_index() == 0:
                self._apply_retention()
        except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
            self._error = e

    def _apply_retention(self) -> None:
        # Only the commit file is looked at: stat-ing every file of every step would cost many
        # requests per save on cloud storage; damaged steps are found when a run resumes.
        committed = [s for s, d in step_dirs(self.directory).items() if (d / COMMIT_FILE).exists()]
        for old in steps_to_delete(committed, self.keep, self.keep_every):
            shutil.rmtree(self.directory / str(old), ignore_errors=True)

    def _finish_pending(self) -> None:
        if self._committer is not None:
            self._committer.join()
            self._committer = None
        step, self._pending_step = self._pending_step, None
        if self._error is not None:
            error, self._error = self._error, None
            raise self._write_error(step, error) from error
        if step is not None:
            self.last_committed = step

    def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        previous = committed_steps(self.run_dir) if jax.process_index() == 0 else []
        keeps = f"the previous checkpoint (step {previous[-1]}) is intact" if previous else "no earlier checkpoint"
        return CheckpointWriteError(
            f"writing checkpoint step {step} to {self.directory} failed ({type(error).__name__}: {error}); {keeps}"
        )

    def committed_step(self) -> int | None:
        """The newest step this run committed (or resumed from), once any save in flight is done."""
        self._finish_pending()
        return self.last_committed

    def wait(self) -> None:
        """Blocks until the last save is committed (raises CheckpointWriteError if it failed)."""
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self._writer.close()

    # -- resuming

    def restore_latest(self, layout: StateLayout) -> Restored | None:
        """The newest usable checkpoint on the layout's mesh, or None if the run has none.

        Steps that were never committed are invisible; committed ones that fail their checks
        or their restore are skipped with a warning. Both are moved to RUN_DIR/checkpoints_unusable
        so that the resumed run can write those step numbers again. If committed checkpoints
        exist but none is usable, this raises rather than silently starting over.
        """
        skipped: list[tuple[int, str]] = []
        restored = None
        corrupt = False
        for step, step_dir in sorted(step_dirs(self.directory).items(), reverse=True):
            problem = check_step(step_dir)
            if problem is None:
                try:
                    restored = _restore(step_dir, layout)
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - a damaged step: fall back to an older one
                    problem = f"restore failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            if restored is not None:
                break
            corrupt = corrupt or (step_dir / COMMIT_FILE).exists()
            skipped.append((step, problem))
            warn(f"checkpoint step {step} in {self.directory} is unusable: {problem}; skipping it")
        if restored is None and corrupt:
            listing = "; ".join(f"step {s}: {p}" for s, p in skipped)
            raise CheckpointError(
                f"no usable checkpoint in {self.directory} ({listing}). If they were written with another "
                f"model or optimizer config, resume with that config; if they are damaged, move the directory "
                f"away to start over"
            )
        self._set_aside([s for s, _ in skipped])
        self.last_committed = restored.step if restored is not None else None
        return restored

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_count() > 1:  # every process has read before any directory moves
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("flaxpod-checkpoint-set-aside")
        if jax.process_index() != 0:
            return
        target = self.run_dir / UNUSABLE
        target.mkdir(parents=True, exist_ok=True)
        for step in steps:
            destination = target / f"{step}-{int(time.time())}"
            shutil.move(str(self.directory / str(step)), destination)
            warn(f"moved unusable checkpoint step {step} to {destination}")

    def remove_partial_saves(self) -> None:
        """Deletes Orbax's temporary directories left by a run that was killed while saving."""
        if jax.process_index() != 0 or not self.directory.exists():
            return
        for p in self.directory.iterdir():
            if _TMP_MARK in p.name:
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint outside training (evaluation, export, finetuning)


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[int, epath.Path]:
    """(step, directory) of `step`, or of the newest usable checkpoint when step is None.

    Newer unusable steps are skipped with a warning; an explicit step that is missing or
    unusable raises CheckpointError. Reads no array.
    """
    directory = checkpoints_dir(run_dir)
    if step is not None:
        return step, _resolve_step(directory, step)
    dirs = step_dirs(directory)
    for s in sorted(dirs, reverse=True):
        problem = check_step(dirs[s])
        if problem is None:
            return s, dirs[s]
        warn(f"checkpoint step {s} in {directory} is unusable: {problem}; skipping it")
    raise CheckpointError(f"no usable checkpoint in {directory}")


def read_run_info(run_dir: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, run item) of a checkpoint: {'config': resolved config dict, 'tokenizer': {...}}."""
    step, step_dir = find_checkpoint(run_dir, step)
    with _reader() as reader:
        out = reader.restore(step_dir, args=ocp.args.Composite(**{RUN: ocp.args.JsonRestore()}))
    return step, out[RUN]


def tokenizer_from_run_info(run_info: dict[str, Any]):
    """The tokenizer stored in a checkpoint's run item."""
    from flaxpod.data.tokenizer import load_tokenizer

    tok = run_info["tokenizer"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, tok["filename"]).write_bytes(base64.b64decode(tok["base64"]))
        return load_tokenizer(tmp)


def _param_target(run_info: dict[str, Any], target: Any) -> Any:
    """Abstract params with shardings: the layout's, the config's rules on a mesh, one device, or
    `target` itself when it already is a tree of jax.ShapeDtypeStruct."""
    if isinstance(target, StateLayout):
        return _abstract(target.shapes[PARAMS], target.param_shardings)
    if _is_abstract_tree(target):
        return target
    if target is not None and not isinstance(target, Mesh):
        raise TypeError(
            f"restore_params: target must be a StateLayout, a Mesh, a tree of jax.ShapeDtypeStruct or None, "
            f"got {type(target).__name__}"
        )
    from flax import nnx
    from flaxpod.sharding.mesh import param_shardings
    from flaxpod.sharding.rules import make_rules
    from flaxpod.train.config import config_from_dict
    from flaxpod.train.state import abstract_model

    cfg = config_from_dict(run_info["config"])
    _, abstract = abstract_model(cfg.model)
    shapes = nnx.to_pure_dict(abstract)
    if isinstance(target, Mesh):
        shardings = param_shardings(abstract, target, make_rules(cfg.mesh.rules, cfg.mesh.rule_overrides))
    else:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    return _abstract(shapes, shardings)


def restore_params(
    run_dir: str | Path,
    step: int | None = None,
    target: StateLayout | Mesh | Any | None = None,
) -> tuple[dict, int]:
    """Reads only the parameters of a checkpoint (no optimizer state): for evaluation, export
    and finetuning. Returns (params as a pure dict, step).

    run_dir: the run directory (holding checkpoints/). step: a step number, or None for the
        newest usable checkpoint (newer unusable ones are skipped with a warning); an explicit
        step that is missing or unusable raises CheckpointError (a ValueError).
    target: where the arrays go. A StateLayout: its parameter shardings. A Mesh: the shardings
        the checkpoint's own config (mesh.rules, mesh.rule_overrides) gives on that mesh. A tree
        of jax.ShapeDtypeStruct with shardings: exactly those. None: every array whole on the first
        device. Any mesh or device count works: the arrays are resharded as they are read.
    """
    step, step_dir = find_checkpoint(run_dir, step)
    with _reader() as reader:
        run_info = {}
        if (step_dir / RUN).exists():
            run_info = reader.restore(step_dir, args=ocp.args.Composite(**{RUN: ocp.args.JsonRestore()}))[RUN]
        if "config" not in run_info and not isinstance(target, StateLayout) and not _is_abstract_tree(target):
            raise CheckpointError(f"{step_dir}: has no run item (config); pass a StateLayout or abstract target")
        abstract = _param_target(run_info, target)
        out = reader.restore(step_dir, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract)}))
    return out[PARAMS], step


def _is_abstract_tree(target: Any) -> bool:
    leaves = jax.tree.leaves(target) if target is not None and not isinstance(target, Mesh) else []
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


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


def params_bytes(params: Any) -> int:
    """Bytes of a parameter (or any array) tree."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def directory_bytes(path: str | Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
