"""Run metrics: metrics.jsonl rows, TensorBoard event files and a console progress line.

Only process 0 writes. Values arrive as host floats: the loop fetches device metrics once per
log interval, never per step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from flaxpod.data.progress import format_duration

__all__ = ["MetricsWriter", "StepProgress", "drop_rows_after", "format_duration"]  # format_duration: for the loop


class MetricsWriter:
    """Appends rows to metrics.jsonl (and TensorBoard). `resume_step`: the step the run continues
    from; rows a killed run wrote after it are dropped, so a resumed run's metrics read as if it
    had never stopped."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            drop_rows_after(path, resume_step)
        self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step hides the events a killed run wrote after the resumed step.
            purge = resume_step + 1 if resume_step else None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=10, purge_step=purge)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrites a metrics.jsonl without rows past `step` and without a line cut short by a kill."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _plain(v: Any) -> Any:
    return float(v) if hasattr(v, "dtype") else v


class StepProgress:
    """A console line per log step: loss, lr, throughput, MFU and ETA (data jobs have data.progress.Progress,
    a redrawn byte-progress bar; both share format_duration)."""

    def __init__(self, total_steps: int, *, enabled: bool, stream=None):
        # sys.stdout is looked up when the run starts, not when this module is imported (it may have been replaced)
        self.total, self.enabled, self.stream = total_steps, enabled, stream if stream is not None else sys.stdout
        self.start = time.perf_counter()

    def show(self, step: int, m: dict[str, float], step_seconds: float) -> None:
        if not self.enabled:
            return
        eta = step_seconds * (self.total - step)
        print(
            f"step {step:>6}/{self.total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"gnorm {m['grad_norm']:.3f} | {m['tokens_per_sec']:,.0f} tok/s | "
            f"{1000 * step_seconds:.1f} ms/step | mfu {100 * m['mfu']:.2f}% | "
            f"eta {format_duration(eta)}",
            file=self.stream,
            flush=True,
        )
