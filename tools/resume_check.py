"""Kill a run and resume it, then compare it with an uninterrupted run: the first differing step.

    python -m tools.resume_check configs/tiny.yaml data.path=... train.steps=200 \\
        --work /tmp/resume --signal KILL --at-checkpoint 100

runs the same `flaxpod pretrain` command twice side by side in WORK/reference and
WORK/interrupted, sends SIGNAL to the second one right after its checkpoint AT_CHECKPOINT is
committed (or, with --at-step S, once its metrics.jsonl reaches step S), re-runs the same command
on WORK/interrupted until it finishes, and compares every metric row (loss, grad_norm, lr,
val_loss, skipped_steps) and the final parameters bit for bit. Exit code 0 if they are identical.
Pass `train.log_every=1` to compare every step's loss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COMPARED = ("loss", "grad_norm", "lr", "val_loss", "skipped_steps")


def pretrain_command(config: str, overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "flaxpod.train.pretrain", config, *overrides, f"run_dir={run_dir}"]


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """Starts a run in the repository root with its output appended to log_path."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ if env is None else env)
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, **popen)


def last_metric_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass
    return max(steps)


def is_committed(run_dir: Path, step: int) -> bool:
    from flaxpod.train.checkpoint_files import CHECKPOINTS, COMMIT_FILE

    return (run_dir / CHECKPOINTS / str(step) / COMMIT_FILE).exists()


def wait_until(proc: subprocess.Popen, ready, *, timeout: float = 600.0, poll: float = 0.005) -> bool:
    """Polls until ready() holds (True) or proc ends or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(poll)
    return False


def signal_when(proc: subprocess.Popen, ready, sig: int, *, timeout: float = 600.0) -> bool:
    """Sends `sig` to proc as soon as ready() holds; False if proc ended (or timed out) first."""
    if not wait_until(proc, ready, timeout=timeout):
        return False
    proc.send_signal(sig)
    return True


def metric_rows(run_dir: Path) -> dict[tuple[int, str], float]:
    """(step, key) -> value for the compared keys; a later row wins (a resumed run rewrites)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in COMPARED:
            if key in row:
                out[(int(row["step"]), key)] = row[key]
    return out


@dataclass
class Comparison:
    compared_rows: int = 0
    first_difference: tuple[int, str, float, float] | None = None
    missing: list[tuple[int, str]] = field(default_factory=list)
    params_equal: bool = False
    params_max_abs_diff: float = float("nan")
    params_bytes: int = 0


def compare_runs(reference: Path, other: Path, *, from_step: int = 0) -> Comparison:
    """Metric rows after `from_step` and the final parameters, compared bit for bit."""
    from flaxpod.train.run_dir import restore_params

    result = Comparison()
    ref, oth = metric_rows(reference), metric_rows(other)
    for key in sorted(k for k in ref if k[0] > from_step):
        if key not in oth:
            result.missing.append(key)
            continue
        result.compared_rows += 1
        a, b = ref[key], oth[key]
        if result.first_difference is None and np.float64(a).tobytes() != np.float64(b).tobytes():
            result.first_difference = (key[0], key[1], a, b)
    pa, step_a = restore_params(reference)
    pb, step_b = restore_params(other)
    if step_a != step_b:
        return result
    leaves_a = [np.asarray(x) for x in _leaves(pa)]
    leaves_b = [np.asarray(x) for x in _leaves(pb)]
    result.params_equal = all(x.tobytes() == y.tobytes() for x, y in zip(leaves_a, leaves_b, strict=True))
    result.params_max_abs_diff = max(float(np.max(np.abs(x - y))) for x, y in zip(leaves_a, leaves_b, strict=True))
    result.params_bytes = sum(x.nbytes for x in leaves_a)
    return result


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.resume_check", description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--work", required=True, type=Path, help="directory for the two runs (emptied)")
    parser.add_argument("--signal", default="KILL", help="KILL, TERM or INT (default KILL)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--at-checkpoint", type=int, help="signal right after this step's checkpoint is committed")
    where.add_argument("--at-step", type=int, help="signal once metrics.jsonl reaches this step")
    args = parser.parse_args(argv)
    sig = getattr(signal, f"SIG{args.signal.upper().removeprefix('SIG')}")

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    ref_dir, int_dir = args.work / "reference", args.work / "interrupted"
    t0 = time.perf_counter()
    ref = start(pretrain_command(args.config, args.overrides, ref_dir), args.work / "reference.log")
    run = start(pretrain_command(args.config, args.overrides, int_dir), args.work / "interrupted.log")
    if args.at_checkpoint is not None:
        sent = signal_when(run, lambda: is_committed(int_dir, args.at_checkpoint), sig)
    else:
        sent = signal_when(run, lambda: last_metric_step(int_dir) >= args.at_step, sig)
    code = run.wait()
    at = last_metric_step(int_dir)
    print(f"signal {sig.name} sent: {sent}; interrupted run exited with {code} at metrics step {at}")
    if not sent:
        print("the run ended before the signal could be sent; use a longer run")
        return 1
    resume = start(pretrain_command(args.config, args.overrides, int_dir), args.work / "interrupted.log")
    resume_code, ref_code = resume.wait(), ref.wait()
    print(f"resumed run exited with {resume_code}; reference run with {ref_code} ({time.perf_counter() - t0:.0f} s)")
    log = (args.work / "interrupted.log").read_text()
    resumed_from = [line for line in log.splitlines() if line.startswith("resumed from")]
    print(resumed_from[-1] if resumed_from else "the second start did not resume (no checkpoint?)")
    if resume_code or ref_code:
        return 1
    from_step = int(resumed_from[-1].rsplit("/", 1)[1]) if resumed_from else 0
    c = compare_runs(ref_dir, int_dir, from_step=from_step)
    first = "none" if c.first_difference is None else f"step {c.first_difference[0]} ({c.first_difference[1]})"
    print(f"metric rows compared after step {from_step}: {c.compared_rows}; first differing step: {first}")
    if c.missing:
        print(f"rows missing from the resumed run: {c.missing[:5]}")
    print(
        f"final parameters ({c.params_bytes:,} bytes): bitwise equal: {c.params_equal}; "
        f"max |difference| {c.params_max_abs_diff:g}"
    )
    return 0 if c.first_difference is None and not c.missing and c.params_equal else 1


if __name__ == "__main__":
    sys.exit(main())
