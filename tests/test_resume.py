"""End to end, in real processes: kill -9 and SIGTERM then resume (bit for bit), restore onto
fewer devices and train on (to 1e-5), non-finite steps under both policies, a disk that fills up.

Runs share a persistent compilation cache, so only the first run of each program compiles.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flaxpod.sharding.launch import xla_flags_with_device_count
from flaxpod.train.checkpoint_files import committed_steps
from flaxpod.train.faults import EXIT_CHECKPOINT_WRITE, EXIT_NONFINITE, EXIT_STOPPED
from flaxpod.train.run_dir import restore_params

from tools.resume_check import (
    compare_runs,
    is_committed,
    last_metric_step,
    metric_rows,
    signal_when,
    start,
    wait_until,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 80, 40
TINY = [
    "tokenizer.kind=char",
    "model.n_layer=2",
    "model.n_kv_head=4",
    "model.d_model=64",
    "model.seq_len=32",
    "data.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_steps=1",
    "logging.tensorboard=false",
]
TWO_DEVICES = ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while my cat sat on its mat".split()
    lines = [" ".join(rng.choice(words, 12)) for _ in range(2500)]
    (root / "corpus.txt").write_text("\n".join(lines))
    return root


def env(work: Path, devices: int) -> dict[str, str]:
    """This process's environment (XLA flags, compilation cache) with `devices` CPU devices."""
    out = dict(os.environ)
    out["XLA_FLAGS"] = xla_flags_with_device_count(out.get("XLA_FLAGS", ""), devices)
    out["JAX_PLATFORMS"] = "cpu"
    out.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "compile_cache"))
    out.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return out


PRETRAIN = [sys.executable, "-m", "flaxpod.train.pretrain"]
# Every single-process run on 2 devices goes through the NaN-injecting wrapper (most with nothing to
# inject): its batches carry a loss mask, so they all share one compiled program and the cache.
MASKED = [sys.executable, str(ROOT / "tests" / "poisoned_pretrain.py")]


def command(work: Path, run_dir: Path, *overrides: str, script: list[str] | None = None) -> list[str]:
    head = script or [*MASKED, "none"]
    args = [str(ROOT / "configs" / "tiny.yaml"), f"data.path={work / 'corpus.txt'}", *TINY, *overrides]
    return [*head, *args, f"run_dir={run_dir}"]


def run(cmd: list[str], log: Path, environ: dict[str, str], **popen) -> tuple[int, str]:
    """Runs to the end; (exit code, the whole log so far)."""
    code = start(cmd, log, environ, **popen).wait(timeout=900)
    return code, log.read_text()


def resumed_from(log: str) -> int:
    return int(re.findall(r"resumed from .*/checkpoints/(\d+)", log)[-1])


@pytest.fixture(scope="module")
def reference(work):
    run_dir = work / "reference"
    overrides = [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", *TWO_DEVICES]
    code, log = run(command(work, run_dir, *overrides), work / "reference.log", env(work, 2))
    assert code == 0, log[-3000:]
    return run_dir


def assert_same_run(reference: Path, other: Path, from_step: int) -> None:
    c = compare_runs(reference, other, from_step=from_step)
    assert not c.missing, c.missing[:5]
    assert c.first_difference is None, c.first_difference
    assert c.compared_rows >= 3 * (STEPS - from_step)  # loss, grad_norm, lr of every step at least
    assert c.params_equal, c.params_max_abs_diff


def test_kill9_right_after_a_checkpoint_resumes_bit_for_bit(work, reference):
    run_dir = work / "killed"
    cmd = command(work, run_dir, f"train.steps={STEPS}", f"checkpoint.every={EVERY}", *TWO_DEVICES)
    proc = start(cmd, work / "killed.log", env(work, 2))
    assert signal_when(proc, lambda: is_committed(run_dir, EVERY), signal.SIGKILL), "ended before the kill"
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not is_committed(run_dir, STEPS) and last_metric_step(run_dir) < STEPS
    code, log = run(cmd, work / "killed.log", env(work, 2))
    assert code == 0, log[-3000:]
    assert resumed_from(log) == EVERY
    assert_same_run(reference, run_dir, EVERY)


def test_sigterm_at_any_step_checkpoints_it_and_resumes_bit_for_bit(work, reference):
    run_dir = work / "terminated"
    cmd = command(work, run_dir, f"train.steps={STEPS}", f"checkpoint.every={EVERY}", *TWO_DEVICES)
    proc = start(cmd, work / "terminated.log", env(work, 2))
    assert signal_when(proc, lambda: last_metric_step(run_dir) >= 13, signal.SIGTERM), "ended before the signal"
    assert proc.wait(timeout=300) == EXIT_STOPPED
    log = (work / "terminated.log").read_text()
    stopped = int(re.findall(r"stopped at step (\d+) \(SIGTERM\)", log)[-1])
    assert 13 <= stopped < STEPS and is_committed(run_dir, stopped)
    code, log = run(cmd, work / "terminated.log", env(work, 2))
    assert code == 0, log[-3000:]
    assert resumed_from(log) == stopped
    assert_same_run(reference, run_dir, stopped)


def test_saved_on_8_devices_restored_on_4_and_1_trains_on(work):
    """fsdp 4 x tensor 2 -> tensor 4 on 4 devices, and -> one device: each continued run's losses
    and final parameters match the uninterrupted 8-device run to 1e-5."""
    eight = work / "eight"
    steps = ["train.steps=6", "checkpoint.every=3"]
    cmd = command(work, eight, *steps, "mesh.fsdp=4", "mesh.tensor=2", script=PRETRAIN)
    code, log = run(cmd, work / "eight.log", env(work, 8))
    assert code == 0, log[-3000:]
    procs = []
    for devices, mesh in ((4, ["mesh.fsdp=1", "mesh.tensor=4"]), (1, ["mesh.fsdp=1", "mesh.tensor=1"])):
        run_dir = work / f"on{devices}"
        shutil.copytree(eight, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "6")
        log_path = work / f"on{devices}.log"
        cmd = command(work, run_dir, *steps, *mesh, script=PRETRAIN)
        procs.append((run_dir, log_path, start(cmd, log_path, env(work, devices))))
    reference = metric_rows(eight)
    expected_params, _ = restore_params(eight)
    for run_dir, log_path, proc in procs:
        assert proc.wait(timeout=900) == 0, log_path.read_text()[-3000:]
        assert resumed_from(log_path.read_text()) == 3
        rows = metric_rows(run_dir)
        later = sorted(k for k in reference if k[0] > 3 and k[1] == "loss")
        assert len(later) == 3
        np.testing.assert_allclose([rows[k] for k in later], [reference[k] for k in later], rtol=1e-5)
        params, step = restore_params(run_dir)
        assert step == 6
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


POISON = [*MASKED, "5,6"]


def test_nonfinite_skip_keeps_parameters_and_counts(work):
    run_dir = work / "nan_skip"
    cmd = command(
        work, run_dir, "train.steps=8", "checkpoint.every=2", "checkpoint.keep=10", *TWO_DEVICES, script=POISON
    )
    code, log = run(cmd, work / "nan_skip.log", env(work, 2))
    assert code == 0, log[-3000:]
    assert "non-finite loss or gradients at step 5" in log and "step 6" in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert np.isnan(losses[5]) and np.isnan(losses[6]) and np.isfinite(losses[7])
    assert [r["skipped_steps"] for r in rows if "skipped_steps" in r] == [0, 0, 0, 0, 1, 2, 2, 2]
    at4, _ = restore_params(run_dir, step=4)
    at6, _ = restore_params(run_dir, step=6)
    at8, _ = restore_params(run_dir, step=8)
    for a, b, c in zip(jax.tree.leaves(at4), jax.tree.leaves(at6), jax.tree.leaves(at8), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # steps 5 and 6 changed nothing
        assert np.isfinite(np.asarray(c)).all() and not np.array_equal(b, c)


def test_nonfinite_stop_exits_3_and_keeps_the_last_good_checkpoint(work):
    run_dir = work / "nan_stop"
    overrides = ["train.steps=8", "checkpoint.every=4", "train.nonfinite=stop", *TWO_DEVICES]
    code, log = run(command(work, run_dir, *overrides, script=POISON), work / "nan_stop.log", env(work, 2))
    assert code == EXIT_NONFINITE, log[-3000:]
    assert (
        "NonFiniteStop: non-finite loss or gradients at step 5" in log
        and "last checkpoint, step 4, was written before it" in log
    )
    assert committed_steps(run_dir) == [4]
    params, _ = restore_params(run_dir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(work):
    run_dir = work / "disk_full"
    first = command(work, run_dir, "train.steps=8", "checkpoint.every=4", *TWO_DEVICES)
    code, log = run(first, work / "disk_full.log", env(work, 2))
    assert code == 0, log[-3000:]
    before, _ = restore_params(run_dir)

    def small_disk():  # files cannot grow past 64 kB: the parameters' data file is larger
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    again = command(work, run_dir, "train.steps=16", "checkpoint.every=4", *TWO_DEVICES)
    code, log = run(again, work / "disk_full.log", env(work, 2), preexec_fn=small_disk)
    assert code == EXIT_CHECKPOINT_WRITE, log[-3000:]
    assert re.search(r"error: writing checkpoint step 12 .* failed .*previous checkpoint \(step 8\) is intact", log)
    assert committed_steps(run_dir) == [4, 8]
    after, step = restore_params(run_dir)
    assert step == 8
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _children(launcher: subprocess.Popen) -> dict[int, int]:
    """FLAXPOD_PROCESS_ID -> pid of the launcher's children (Linux /proc)."""
    pids = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    out = {}
    for pid in map(int, pids):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"FLAXPOD_PROCESS_ID=")]
        out[int(rank[0])] = pid
    return out


def test_two_processes_save_and_stop_at_the_same_step(work):
    """2 processes x 2 devices, each request sent to one process only: SIGUSR1 to process 1 is
    agreed on by the all-gather every checkpoint.sync_every steps (one checkpoint, by both), SIGTERM
    to process 0 through JAX's preemption sync point (both stop after the same step)."""
    run_dir = work / "two_processes"
    pretrain = command(
        work, run_dir, "train.steps=2000", "checkpoint.every=1000", "checkpoint.sync_every=4", script=PRETRAIN
    )
    launch = [sys.executable, "-m", "flaxpod.sharding.launch", "--num-processes", "2", "--devices-per-process", "2"]
    log = work / "two_processes.log"
    launcher = start([*launch, "--grace-period", "300", "--", *pretrain], log, env(work, 2))
    assert wait_until(launcher, lambda: last_metric_step(run_dir) >= 3), "ended early"
    children = _children(launcher)
    os.kill(children[1], signal.SIGUSR1)
    assert wait_until(launcher, lambda: bool(committed_steps(run_dir))), "no checkpoint"
    saved = committed_steps(run_dir)[0]
    os.kill(children[0], signal.SIGTERM)
    launcher.wait(timeout=300)
    text = log.read_text()
    assert saved % 4 == 0 and re.search(rf"\[p0\] step +{saved}/2000 \| checkpoint \(a request on another", text)
    stopped = {int(s) for s in re.findall(r"\[p[01]\] StopRequested: stopped at step (\d+) \(preemption", text)}
    assert len(re.findall(r"StopRequested", text)) == 2 and len(stopped) == 1, text[-3000:]
    assert committed_steps(run_dir) == [saved, stopped.pop()]
