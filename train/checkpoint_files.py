"""The on-disk format of checkpoints, shared by the writer (train/checkpoint.py) and the run reader
(train/run_dir.py): step directories, commit records and the checks that make a step usable.

One checkpoint is one Orbax step, RUN_DIR/checkpoints/<step>/:

    params/          model parameters (Orbax PyTree)
    train_state/     the rest of the train state: optimizer state, step, RNG key, skipped-step count
    data/            every process's data-iterator state, process_<i>-of-<n>.json (a JSON-able dict each)
    run/             the resolved config and the tokenizer (JSON), so a checkpoint stands on its own
    flaxpod_commit.json   written last, once Orbax has finished: the size and SHA-256 of every file above

A step directory without a commit file is invisible (a save that was cut short); one whose files
do not match their recorded sizes is unusable, and so is one whose content no longer matches its
recorded hashes (checked before a step is read: `check_step(..., content=True)`). A params-only
checkpoint (imported weights) has just `params/` and `run/`. Only directories named by ASCII
decimal digits are steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flaxpod.model.errors import InputError

CHECKPOINTS = "checkpoints"
UNUSABLE = "checkpoints_unusable"  # where unusable steps are moved, next to CHECKPOINTS
COMMIT_FILE = "flaxpod_commit.json"
PARAMS, TRAIN_STATE, DATA, RUN = "params", "train_state", "data", "run"
REQUIRED_ITEMS = (PARAMS,)  # params-only checkpoints have no train_state
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(InputError):
    """The one error for "no usable step": a requested step is missing or unusable, or a run
    directory has no usable checkpoint."""


def warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def checkpoints_dir(run_dir: str | Path) -> epath.Path:
    """RUN_DIR/checkpoints (absolute: Orbax requires it; URLs such as gs://... are kept as they are)."""
    text = str(run_dir)
    return epath.Path(text if "://" in text else os.path.abspath(text)) / CHECKPOINTS


_warned_names: set[str] = set()


def is_step_name(name: str) -> bool:
    """Only ASCII decimal digits name a step: `str.isdigit` also accepts '²' (which int() refuses)
    and '٣٠٠' (which int() reads as 300, hiding the real step 300)."""
    return name.isascii() and name.isdigit()


def step_dirs(directory: epath.Path) -> dict[int, epath.Path]:
    """Step number -> directory, for every directory named by ASCII digits. Orbax's temporary
    `<step>.orbax-checkpoint-tmp*` directories are not steps; any other name is ignored with a
    warning (once per process)."""
    if not directory.exists():
        return {}
    out = {}
    for p in directory.iterdir():
        if is_step_name(p.name) and p.is_dir():
            out[int(p.name)] = p
        elif TMP_MARK not in p.name and str(p) not in _warned_names:
            _warned_names.add(str(p))
            warn(f"ignoring {p!s}: not a checkpoint step (steps are directories named by ASCII digits)")
    return out


def _sha256(path: epath.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: epath.Path) -> dict[str, epath.Path]:
    """Relative path -> path of every file below root (without recursive globbing, which
    epath refuses on cloud storage)."""
    out: dict[str, epath.Path] = {}
    pending = [root]
    while pending:
        directory = pending.pop()
        for p in directory.iterdir():
            if p.is_dir():
                pending.append(p)
            elif p.name != COMMIT_FILE and not p.name.startswith(f".{COMMIT_FILE}"):
                out[str(p.relative_to(root))] = p
    return out


def write_commit(step_dir: epath.Path, step: int) -> None:
    """Records every file's size and SHA-256, then renames the record into place: the step is
    committed. (Hashing reads the step once more: about 2 s per GB on one core, see
    docs/reliability.md; it runs in the background commit thread.)"""
    files = _files(step_dir)
    record = {
        "step": step,
        "time": time.time(),
        "files": {name: files[name].stat().length for name in sorted(files)},
        "sha256": {name: _sha256(files[name]) for name in sorted(files)},
    }
    tmp = step_dir / f".{COMMIT_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=0))
    tmp.replace(step_dir / COMMIT_FILE)


def check_step(step_dir: epath.Path, *, content: bool = False) -> str | None:
    """What is wrong with a step directory, or None if it is a complete checkpoint.

    Sizes are always checked (one stat per file); with `content`, every file's SHA-256 as well
    (reads the whole step: do it for the step about to be restored, not when listing steps).
    Records written before hashes were recorded are checked by size only."""
    commit = step_dir / COMMIT_FILE
    if not commit.exists():
        return f"no {COMMIT_FILE} (the save never completed)"
    try:
        record = json.loads(commit.read_text())
        files = record["files"]
        hashes = record.get("sha256") or {}
        if not isinstance(files, dict) or not isinstance(hashes, dict):
            raise TypeError("'files' and 'sha256' must be mappings")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
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
    if content:
        for name, digest in hashes.items():
            if _sha256(step_dir / name) != digest:
                return f"file {name} does not hold the bytes that were written (SHA-256 differs)"
    return None


def committed_steps(run_dir: str | Path) -> list[int]:
    """Steps with a valid commit record, oldest first (no array is read)."""
    return sorted(s for s, d in step_dirs(checkpoints_dir(run_dir)).items() if check_step(d) is None)


def steps_to_delete(steps: list[int], keep: int, keep_every: int = 0) -> list[int]:
    """Committed steps outside the policy: not among the newest `keep`, and not a multiple of
    `keep_every` (those stay permanently)."""
    newest = set(sorted(steps)[-keep:]) if keep > 0 else set()
    return [s for s in sorted(steps) if s not in newest and not (keep_every and s % keep_every == 0)]


def usable_steps(run_dir: str | Path, step: int | None = None) -> Iterator[tuple[int, epath.Path]]:
    """(step, directory) of the steps a reader should try, newest first, each checked (sizes and
    content) just before it is yielded: only `step` when given, else every step, the unusable
    ones skipped with a warning. An explicit step that is missing or unusable raises
    CheckpointError. A reader that then fails to restore a step moves on to the next one."""
    directory = checkpoints_dir(run_dir)
    dirs = step_dirs(directory)
    if step is not None:
        if step not in dirs:
            available = sorted(s for s, d in dirs.items() if check_step(d) is None)
            raise CheckpointError(f"no checkpoint step {step} in {directory}; usable steps: {available or 'none'}")
        problem = check_step(dirs[step], content=True)
        if problem:
            raise CheckpointError(f"checkpoint step {step} in {directory} is unusable: {problem}")
        yield step, dirs[step]
        return
    for s in sorted(dirs, reverse=True):
        problem = check_step(dirs[s], content=True)
        if problem is None:
            yield s, dirs[s]
        else:
            warn(f"checkpoint step {s} in {directory} is unusable: {problem}; skipping it")


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[int, epath.Path]:
    """(step, directory) of `step`, or of the newest usable checkpoint when step is None (see
    `usable_steps`); CheckpointError when there is none."""
    for found in usable_steps(run_dir, step):
        return found
    raise CheckpointError(f"no usable checkpoint in {checkpoints_dir(run_dir)}")


def abstract(shapes: Any, shardings: Any) -> Any:
    """Restore targets: shapes and dtypes with the shardings to read them onto (any mesh)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


@contextlib.contextmanager
def reader() -> Iterator[ocp.Checkpointer]:
    handle = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        yield handle
    finally:
        handle.close()
