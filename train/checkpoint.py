"""Orbax checkpoints of the train state together with every process's data-iterator state.

Layout: RUN_DIR/checkpoints/<step>/{state, data}. Orbax writes a step under a temporary name and
renames it when complete, so a step directory that is listed is a complete one. The state is
restored against an abstract target carrying the current mesh's shardings, which reshards a
checkpoint written on another mesh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from train.state import StateLayout, TrainState


class IteratorStateBox:
    """Holds a snapshot of a Grain iterator's state for Grain's Orbax handler.

    Saving the live iterator would let an asynchronous save read a later state than the step
    being saved; a snapshot taken at save time cannot drift. (The handler takes bytes from
    objects that are not Grain iterators.)
    """

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by the handler after restore
        pass


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict | None) -> None:
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = grain.checkpoint.CheckpointSave(IteratorStateBox(data_state))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, layout: StateLayout) -> tuple[TrainState, dict | None]:
        target = jax.tree.map(
            lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
            layout.shapes,
            layout.shardings,
        )
        args: dict[str, Any] = {"state": ocp.args.StandardRestore(target)}
        has_data = (self.directory / str(step) / "data").exists()
        if has_data:
            args["data"] = grain.checkpoint.CheckpointRestore(IteratorStateBox())
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        data_state = restored["data"].state if has_data else None
        return restored["state"], data_state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
