"""Writing checkpoints during training so that no run is ever lost: complete or invisible, verified
on resume, restorable on any mesh. The format is in train/checkpoint_files.py; reading a finished
run (evaluation, generation, export, finetuning's base) is train/run_dir.py.

Orbax writes a step under a temporary name and renames it when done; after that a background
thread writes the commit file. Resuming skips (and moves aside) steps that fail their checks or
their restore, with a warning naming the step, and uses the newest usable one.

Retention is ours, not Orbax's, so that only committed checkpoints count: the newest `keep`
plus, permanently, every step that is a multiple of `keep_every`.

The state is restored against abstract arrays carrying the current mesh's shardings, which
reshards a checkpoint written on another mesh or device count.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flaxpod.model.errors import FlaxpodError
from flaxpod.train.checkpoint_files import (
    COMMIT_FILE,
    DATA,
    PARAMS,
    RUN,
    TMP_MARK,
    TRAIN_STATE,
    UNUSABLE,
    CheckpointError,
    abstract,
    check_step,
    checkpoints_dir,
    committed_steps,
    reader,
    step_dirs,
    steps_to_delete,
    warn,
    write_commit,
)
from flaxpod.train.faults import EXIT_CHECKPOINT_WRITE
from flaxpod.train.state import StateLayout, TrainState

# Orbax's ValueError when a checkpoint's tree differs from the restore target: a config change, not damage.
STRUCTURE_MISMATCH = "tree structures do not match"


class CheckpointWriteError(FlaxpodError, OSError):
    """Writing a checkpoint failed (disk full, run directory not writable); earlier ones are intact."""

    exit_code = EXIT_CHECKPOINT_WRITE


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


def _data_process_count(step_dir: epath.Path) -> int | None:
    data = step_dir / DATA
    if not data.exists():
        return None
    counts = {int(p.name.split("-of-")[1].split(".")[0]) for p in data.iterdir() if "-of-" in p.name}
    return counts.pop() if len(counts) == 1 else None


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
    args: dict[str, Any] = {
        PARAMS: ocp.args.StandardRestore(abstract(layout.shapes.params, layout.shardings.params)),
        TRAIN_STATE: ocp.args.StandardRestore(abstract(layout.shapes.rest(), layout.shardings.rest())),
        RUN: ocp.args.JsonRestore(),
    }
    if saved_processes is not None:
        args[DATA] = grain.checkpoint.CheckpointRestore(IteratorStateBox())
    with reader() as handle:
        out = handle.restore(step_dir, args=ocp.args.Composite(**args))
    state = TrainState(params=out[PARAMS], **out[TRAIN_STATE])
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
        self.protected: set[int] = set()  # kept whatever the retention policy (the best step of a finetuning run)
        self._writer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
        self._committer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending_step: int | None = None
        self.last_committed: int | None = None
        self.committed_at = 0.0  # time.perf_counter() when the last save was committed

    # -- saving

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: dict | None,
        *,
        wait: bool = False,
        on_commit: Callable[[], None] | None = None,
    ) -> float:
        """Starts writing `step`; returns the seconds training was blocked. With `wait`, returns
        only once the step is committed. `on_commit` is called (in the background thread) once
        the step is committed, never if the save fails."""
        start = time.perf_counter()
        self._finish_pending()
        if jax.process_index() == 0:
            self._prepare_directory()
        args: dict[str, Any] = {
            PARAMS: ocp.args.StandardSave(state.params),
            TRAIN_STATE: ocp.args.StandardSave(state.rest()),
            RUN: ocp.args.JsonSave(self.run_info),
        }
        if data_state is not None:
            args[DATA] = grain.checkpoint.CheckpointSave(IteratorStateBox(data_state))
        try:
            self._writer.save(self.directory / str(step), args=ocp.args.Composite(**args), force=True)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._write_error(step, e) from e
        self._pending_step = step
        self._committer = threading.Thread(
            target=self._commit, args=(step, on_commit), name=f"commit-{step}", daemon=True
        )
        self._committer.start()
        if wait or not self.async_save:
            self._finish_pending()
        return time.perf_counter() - start

    def _prepare_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointWriteError(f"cannot create the checkpoint directory {self.directory}: {e}") from e

    def _commit(self, step: int, on_commit: Callable[[], None] | None) -> None:
        """Background: wait for Orbax, write the commit file, apply retention."""
        try:
            self._writer.wait_until_finished()
            if jax.process_index() == 0:
                write_commit(self.directory / str(step), step)
            self.committed_at = time.perf_counter()
            if on_commit is not None:
                on_commit()
            if jax.process_index() == 0:
                self._apply_retention()
        except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
            self._error = e

    def _apply_retention(self) -> None:
        # Only the commit file is looked at: stat-ing every file of every step would cost many
        # requests per save on cloud storage; damaged steps are found when a run resumes.
        committed = [s for s, d in step_dirs(self.directory).items() if (d / COMMIT_FILE).exists()]
        for old in steps_to_delete(committed, self.keep, self.keep_every):
            if old in self.protected:
                continue
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
            problem = check_step(step_dir, content=True)
            if problem is None:
                try:
                    restored = _restore(step_dir, layout)
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - a damaged step: fall back to an older one
                    if isinstance(e, ValueError) and STRUCTURE_MISMATCH in str(e):  # a config change, not damage
                        raise CheckpointError(
                            f"checkpoint step {step} in {self.directory} holds a train state of another structure "
                            f"(written with another model or optimizer config, e.g. optim.grad_clip on/off); resume "
                            f"with that config or choose another run_dir"
                        ) from None
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
            if TMP_MARK in p.name:
                shutil.rmtree(p, ignore_errors=True)


def params_bytes(params: Any) -> int:
    """Bytes of a parameter (or any array) tree."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def directory_bytes(path: str | Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
