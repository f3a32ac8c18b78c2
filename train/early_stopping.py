"""Early stopping on a validation metric, and the record of a run's best step (RUN_DIR/best.json).

The record is rewritten atomically at each evaluation, so a resumed run continues counting where it
stopped; its step is kept whatever the checkpoint retention policy, and `evaluate`/`export` read it
by default (train/run_dir.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
from flaxpod.model.errors import ConfigError

BEST_FILE = "best.json"


@dataclass
class Best:
    metric: str
    value: float
    step: int
    evaluations_since: int = 0  # evaluations without improvement since `step`


def read_best(run_dir: str | Path) -> Best | None:
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    try:
        return Best(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable best-step record ({e}); delete it to start counting anew") from None


class EarlyStopping:
    """Tracks `metric` (lower is better for names ending in `loss` or `perplexity`, higher otherwise).

    `update(step, metrics)` returns (improved, stop): improved means this step is the new best (the
    loop checkpoints it); stop means `patience` evaluations in a row did not improve (0: never)."""

    def __init__(self, run_dir: str | Path, metric: str, patience: int):
        self.path = Path(run_dir) / BEST_FILE
        self.metric, self.patience = metric, patience
        self.lower_is_better = metric.endswith(("loss", "perplexity"))
        self.best = read_best(run_dir)
        if self.best is not None and self.best.metric != metric:
            raise ConfigError(
                f"finetune.early_stop_metric: {metric!r} differs from {self.best.metric!r} recorded in {self.path}; "
                f"resume with the same metric or choose another run_dir"
            )

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else self.best.step

    def update(self, step: int, metrics: dict[str, float]) -> tuple[bool, bool]:
        if self.metric not in metrics:
            raise ConfigError(
                f"finetune.early_stop_metric: {self.metric!r} is not a validation metric of this task; "
                f"choose one of {sorted(metrics)}"
            )
        value = metrics[self.metric]
        better = self.best is None or (value < self.best.value if self.lower_is_better else value > self.best.value)
        if better:
            self.best = Best(self.metric, value, step)
        else:
            self.best.evaluations_since += 1
        self._write()
        return better, bool(self.patience) and self.best.evaluations_since >= self.patience

    def _write(self) -> None:
        if jax.process_index() != 0:
            return
        tmp = self.path.with_name(f".{BEST_FILE}.tmp")
        tmp.write_text(json.dumps(asdict(self.best)))
        os.replace(tmp, self.path)
