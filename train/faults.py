"""What interrupts a run, and how it ends: stop signals, save-now requests, the checkpoint
schedule, non-finite steps, and the exit codes of `flaxpod pretrain`.

Requests a user can make of a running job:

    kill -TERM PID  (or Ctrl-C once)  finish the current step, write a checkpoint of it, wait
                                      until it is on disk, exit with code 75; Ctrl-C twice
                                      interrupts at once
    kill -USR1 PID  or  touch RUN_DIR/SAVE_NOW
                                      write a checkpoint after the current step and go on
                                      (SAVE_NOW is deleted once that checkpoint is committed)

With several processes every process must checkpoint and stop at the same step. SIGTERM goes
through JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`, asked every
step) where JAX's distributed runtime offers it; the other requests (and SIGTERM where it does
not) are agreed on every `checkpoint.sync_every` steps by a tiny all-gather of each process's
flags. SAVE_NOW and the `checkpoint.every_minutes` clock are read on process 0 only.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import numpy as np
from flaxpod.model.errors import FlaxpodError

EXIT_NONFINITE = 3
"""Stopped on a non-finite loss or gradient (train.nonfinite=stop); the last checkpoint is good."""
EXIT_CHECKPOINT_WRITE = 4
"""A checkpoint could not be written (disk full, run directory not writable); earlier ones are intact."""
EXIT_STOPPED = 75
"""Stopped on request (SIGTERM, SIGINT) after writing a checkpoint of the current step: re-run to
resume. 75 is EX_TEMPFAIL, "try again later", which schedulers can treat as requeue."""

SAVE_NOW_FILE = "SAVE_NOW"


class RunInterrupted(FlaxpodError):
    """The run ended early on purpose; `exit_code` says why (the message says what to do)."""

    exit_code = 1

    def one_line(self) -> str:  # the kind of stop is what schedulers' logs are searched for
        return f"{type(self).__name__}: {self}"


class StopRequested(RunInterrupted):
    exit_code = EXIT_STOPPED


class NonFiniteStop(RunInterrupted):
    exit_code = EXIT_NONFINITE


@dataclass
class Decision:
    """What to do after a step: checkpoint it, and/or stop the run, and why."""

    save: bool = False
    stop: bool = False
    reason: str = ""


class RunControl:
    """Decides after each step whether to checkpoint it and whether to stop, with the same answer
    on every process. Use as a context manager: it installs the signal handlers (main thread only)
    and restores the previous ones on exit."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        every: int,
        every_minutes: float = 0.0,
        last_step: int,
        sync_every: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.save_now_path = Path(run_dir) / SAVE_NOW_FILE
        self.every, self.every_seconds, self.last_step = every, every_minutes * 60.0, last_step
        self.sync_every = sync_every
        self.clock = clock
        self.is_main = jax.process_index() == 0
        self.multi = jax.process_count() > 1
        self.jax_preemption = self.multi and _jax_preemption_available()
        self._stop_signal: str | None = None
        self._save_signal = False
        self._last_save_time = clock()
        self._previous: dict[int, Any] = {}
        # (mtime, size) of the SAVE_NOW file a save in flight is serving: that file is not a new
        # request, and is removed only once the save is committed (a kill -9 before then leaves it).
        self._save_now_served: tuple[float, int] | None = None

    # -- signals

    def __enter__(self) -> RunControl:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        handlers = {signal.SIGINT: self._on_stop, signal.SIGUSR1: self._on_save}
        if not self.jax_preemption:  # else JAX's own SIGTERM notifier must stay in place
            handlers[signal.SIGTERM] = self._on_stop
        for sig, handler in handlers.items():
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self._stop_signal = name
        if jax.process_index() == 0:
            print(f"{name} received: stopping after this step with a checkpoint", flush=True)

    def _on_save(self, signum: int, frame: FrameType | None) -> None:
        self._save_signal = True

    def request_stop(self, reason: str) -> None:
        """What a stop signal does, for callers that learn of a stop another way."""
        self._stop_signal = reason

    # -- decisions

    def decide(self, step: int) -> Decision:
        """Call once per step, on every process, with the same step numbers."""
        reasons = []
        save = step == self.last_step or (self.every > 0 and step % self.every == 0)
        stop = False
        if self.jax_preemption:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                stop = True
                reasons.append("preemption notice (SIGTERM)")
        if not self.multi or step % self.sync_every == 0:
            stop_flag, save_flag, why = self._local_requests()
            if self.multi:
                stop_flag, save_flag = _any_process(stop_flag, save_flag)
                why = why or ("a request on another process" if stop_flag or save_flag else "")
            if stop_flag:
                stop = True
                reasons.append(why or "stop request")
            elif save_flag:
                save = True
                reasons.append(why)
        return Decision(save=save or stop, stop=stop, reason="; ".join(r for r in reasons if r))

    def _local_requests(self) -> tuple[bool, bool, str]:
        if self._stop_signal is not None:
            return True, False, self._stop_signal
        if self._save_signal:
            return False, True, "SIGUSR1"
        if self.is_main and self._save_now_request():
            return False, True, f"{self.save_now_path}"
        if self.is_main and self.every_seconds > 0 and self.clock() - self._last_save_time >= self.every_seconds:
            return False, True, f"{self.every_seconds / 60:g} minutes since the last checkpoint"
        return False, False, ""

    def _save_now_stamp(self) -> tuple[float, int] | None:
        try:
            stat = self.save_now_path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime, stat.st_size

    def _save_now_request(self) -> bool:
        stamp = self._save_now_stamp()
        return stamp is not None and stamp != self._save_now_served

    def saved(self) -> Callable[[], None]:
        """Call once a checkpoint is started: restarts the clock and marks the save-now requests as
        served. Returns what to call once that checkpoint is committed: it deletes SAVE_NOW
        (unless the file was touched again since)."""
        self._last_save_time = self.clock()
        self._save_signal = False
        served = self._save_now_stamp() if self.is_main else None
        if served is not None:
            self._save_now_served = served
        return lambda: self._save_now_committed(served)

    def _save_now_committed(self, served: tuple[float, int] | None) -> None:
        if served is not None and self._save_now_stamp() == served:
            self.save_now_path.unlink(missing_ok=True)


def _jax_preemption_available() -> bool:
    from jax.experimental import multihost_utils

    try:
        multihost_utils.reached_preemption_sync_point(0)
    except RuntimeError:
        return False
    return True


def _any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all processes (every process must call this at the same step)."""
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return tuple(bool(v) for v in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))


class NonFiniteWatch:
    """Applies train.nonfinite to fetched per-step metrics (the step itself already kept the old
    parameters): `stop` raises NonFiniteStop, `skip` returns a warning line."""

    def __init__(self, policy: str, skipped_at_start: int):
        if policy not in ("skip", "stop"):
            raise ValueError(f"train.nonfinite: expected 'skip' or 'stop', got {policy!r}")
        self.policy, self.skipped = policy, skipped_at_start

    def check(self, rows: list[tuple[int, dict[str, float]]], last_checkpoint: Callable[[], int | None]) -> str | None:
        """rows: (step, metrics) in step order. last_checkpoint: the newest committed step (called,
        and so waited for, only when stopping)."""
        bad = []
        for step, m in rows:
            total = int(m["skipped_steps"])
            if total > self.skipped:
                bad.append((step, m))
            self.skipped = max(self.skipped, total)
        if not bad:
            return None
        step, m = bad[0]
        steps = ", ".join(str(s) for s, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
        what = f"non-finite loss or gradients at step {steps} (loss {m['loss']}, grad_norm {m['grad_norm']})"
        if self.policy == "stop":
            last = last_checkpoint()
            kept = f"the last checkpoint, step {last}, was written before it" if last else "no checkpoint was written"
            raise NonFiniteStop(
                f"{what}; train.nonfinite=stop: stopping ({kept}); to go on, resume with a lower optim.lr "
                f"or train.nonfinite=skip"
            )
        return f"{what}: update skipped ({self.skipped} skipped in this run so far)"
