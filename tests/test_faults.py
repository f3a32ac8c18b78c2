"""Run control (schedule, time policy, SAVE_NOW, signals), non-finite steps and exit codes."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest
from flaxpod.train.checkpoint import CheckpointWriteError
from flaxpod.train.cli import run_guarded
from flaxpod.train.faults import (
    EXIT_CHECKPOINT_WRITE,
    EXIT_NONFINITE,
    EXIT_STOPPED,
    SAVE_NOW_FILE,
    NonFiniteStop,
    NonFiniteWatch,
    RunControl,
    StopRequested,
)

from tests.tiny_setup import assert_bitwise_equal, batch, host, tiny


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_schedule_and_last_step(tmp_path):
    control = RunControl(tmp_path, every=5, last_step=12)
    saves = [s for s in range(1, 13) if control.decide(s).save]
    assert saves == [5, 10, 12]
    assert not any(control.decide(s).stop for s in range(1, 13))


def test_every_minutes_counts_from_the_last_save(tmp_path):
    clock = FakeClock()
    control = RunControl(tmp_path, every=0, every_minutes=2, last_step=100, clock=clock)
    clock.now = 119.0
    assert not control.decide(1).save
    clock.now = 120.0
    decision = control.decide(2)
    assert decision.save and "2 minutes" in decision.reason
    control.saved()
    clock.now = 200.0
    assert not control.decide(3).save
    clock.now = 240.0
    assert control.decide(4).save


def test_save_now_file(tmp_path):
    control = RunControl(tmp_path, every=0, last_step=100)
    assert not control.decide(1).save
    (tmp_path / SAVE_NOW_FILE).touch()
    decision = control.decide(2)
    assert decision.save and not decision.stop and SAVE_NOW_FILE in decision.reason
    on_commit = control.saved()
    # The file stays until the checkpoint is committed (a kill -9 before then leaves the request),
    # and is not a new request meanwhile.
    assert (tmp_path / SAVE_NOW_FILE).exists()
    assert not control.decide(3).save
    on_commit()
    assert not (tmp_path / SAVE_NOW_FILE).exists()
    assert not control.decide(4).save
    # A request made while a save is in flight is a new one, and survives that save's commit.
    (tmp_path / SAVE_NOW_FILE).write_text("x")
    on_commit = control.saved()
    (tmp_path / SAVE_NOW_FILE).write_text("again")
    on_commit()
    assert (tmp_path / SAVE_NOW_FILE).exists() and control.decide(5).save


def test_save_now_survives_a_save_that_fails(tmp_path):
    """Checkpointer calls on_commit only after the commit record is written: a write that fails
    leaves SAVE_NOW in place."""
    import resource

    import jax
    from flaxpod.train.checkpoint import Checkpointer, CheckpointWriteError

    from tests.tiny_setup import random_state, tiny

    t = tiny()
    control = RunControl(tmp_path, every=0, last_step=100)
    (tmp_path / SAVE_NOW_FILE).touch()
    assert control.decide(1).save
    ck = Checkpointer(tmp_path, keep=2, async_save=False)
    state = jax.device_put(random_state(t.layout, 0), t.layout.shardings)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, hard))
    try:
        with pytest.raises(CheckpointWriteError):
            ck.save(1, state, None, on_commit=control.saved())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / SAVE_NOW_FILE).exists()
    ck.save(2, jax.device_put(random_state(t.layout, 1), t.layout.shardings), None, on_commit=control.saved())
    ck.close()
    assert not (tmp_path / SAVE_NOW_FILE).exists()


def test_signals_request_save_or_stop_and_handlers_are_restored(tmp_path, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with RunControl(tmp_path, every=0, last_step=100) as control:
        os.kill(os.getpid(), signal.SIGUSR1)
        decision = control.decide(1)
        assert decision.save and not decision.stop and decision.reason == "SIGUSR1"
        control.saved()
        assert not control.decide(2).save
        os.kill(os.getpid(), signal.SIGTERM)
        decision = control.decide(3)
        assert decision.stop and decision.save and decision.reason == "SIGTERM"
    assert "SIGTERM received" in capsys.readouterr().out
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_ctrl_c_interrupts_at_once(tmp_path):
    with RunControl(tmp_path, every=0, last_step=100) as control:
        os.kill(os.getpid(), signal.SIGINT)
        assert control.decide(1).stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_nonfinite_watch_policies():
    rows = [(1, {"loss": 2.0, "grad_norm": 1.0, "skipped_steps": 0.0})]
    rows += [(2, {"loss": float("nan"), "grad_norm": float("nan"), "skipped_steps": 1.0})]
    rows += [(3, {"loss": 1.5, "grad_norm": 1.0, "skipped_steps": 1.0})]
    skip = NonFiniteWatch("skip", skipped_at_start=0)
    assert "step 2 " in skip.check(rows, last_checkpoint=lambda: None)
    assert skip.check(rows, last_checkpoint=lambda: None) is None  # each skipped step is reported once
    with pytest.raises(NonFiniteStop, match="at step 2 .*train.nonfinite=stop.*last checkpoint, step 1, was written"):
        NonFiniteWatch("stop", skipped_at_start=0).check(rows, last_checkpoint=lambda: 1)
    assert NonFiniteWatch("stop", skipped_at_start=1).check(rows[2:], last_checkpoint=lambda: 1) is None


def test_nonfinite_step_changes_nothing_but_the_counters():
    """A NaN in the loss (here: a NaN loss weight) leaves params and optimizer state bit for bit
    as they were, counts the step, and the next finite step trains normally."""
    t = tiny(1, 1, 1)
    ones = np.ones((8, 8), np.float32)
    poisoned = ones.copy()
    poisoned[3, 5] = np.nan
    state, _ = t.step(t.init(), t.put(batch(0, loss_mask=ones)))
    before = host(state)
    state, metrics = t.step(state, t.put(batch(1, loss_mask=poisoned)))
    assert np.isnan(float(metrics["loss"])) and int(metrics["skipped_steps"]) == 1
    assert_bitwise_equal(state.params, before.params)
    assert_bitwise_equal(state.opt_state, before.opt_state)
    assert int(state.step) == 2 and int(state.skipped_steps) == 1
    state, metrics = t.step(state, t.put(batch(2, loss_mask=ones)))
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped_steps"]) == 1
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), host(state.params), before.params))
    assert all(changed)


@pytest.mark.parametrize(
    "error, code",
    [
        (StopRequested("stopped at step 3"), EXIT_STOPPED),
        (NonFiniteStop("non-finite"), EXIT_NONFINITE),
        (CheckpointWriteError("disk full"), EXIT_CHECKPOINT_WRITE),
        (ValueError("bad key"), 2),
    ],
)
def test_exit_codes(error, code, capsys):
    def job():
        raise error

    assert run_guarded(job) == code
    assert str(error) in capsys.readouterr().err
