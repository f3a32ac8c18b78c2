"""`python tests/poisoned_pretrain.py 5,6 CONFIG [key=value ...]`: `flaxpod pretrain` whose training
batches carry a loss mask, NaN in one token of the batches of the listed (1-based) steps: a
non-finite loss and gradients exactly there, without a test hook in the library. `none` poisons
nothing (the same program, for runs that share its compilation)."""

from __future__ import annotations

import dataclasses
import sys

import flaxpod.train.loop
import flaxpod.train.pretrain
import numpy as np


class PoisonedIterator:
    """Wraps a data iterator; its state is the wrapped state plus the step count (JSON-able)."""

    def __init__(self, inner, poisoned_steps: set[int]):
        self.inner, self.poisoned_steps, self.step = inner, poisoned_steps, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.inner))
        self.step += 1
        mask = np.ones(batch["targets"].shape, np.float32)
        if self.step in self.poisoned_steps:
            mask[0, 0] = np.nan
        batch["loss_mask"] = mask
        return batch

    def get_state(self) -> dict:
        return {"inner": self.inner.get_state(), "step": self.step}

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state["inner"])
        self.step = state["step"]


def main() -> int:
    steps = set() if sys.argv[1] == "none" else {int(s) for s in sys.argv[1].split(",")}
    load_run_data = flaxpod.train.loop.load_run_data

    def poisoned_run_data(*args, **kwargs):
        data = load_run_data(*args, **kwargs)
        return dataclasses.replace(data, train_iter=PoisonedIterator(data.train_iter, steps))

    flaxpod.train.loop.load_run_data = poisoned_run_data
    return flaxpod.train.pretrain.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
