"""Shared test helpers: tiny corpora, tiny configs and running the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

WORDS = (
    "the a king queen lord lady said spoke to of and in with my thy his her good noble fair "
    "sword crown castle night day love death honour come go shall will not now here there"
).split()


def write_corpus(path: Path, n_chars: int = 40_000, seed: int = 0) -> Path:
    """Pseudo-text with real structure (word frequencies, lines, punctuation) so a model can learn."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, len(WORDS) + 1)
    probs /= probs.sum()
    lines, total = [], 0
    while total < n_chars:
        words = rng.choice(WORDS, size=rng.integers(4, 10), p=probs)
        line = " ".join(words).capitalize() + rng.choice([".", ",", "!", "?"])
        lines.append(line)
        total += len(line) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_overrides(run_dir: Path, corpus: Path, **extra) -> list[str]:
    """A model small enough that a step takes milliseconds on CPU."""
    values = {
        "run_dir": str(run_dir),
        "data.path": str(corpus),
        "tokenizer.kind": "char",
        "model.family": "gpt2",
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.d_model": 32,
        "model.seq_len": 32,
        "data.batch_size": 8,
        "train.steps": 6,
        "train.log_every": 2,
        "train.eval_every": 3,
        "train.eval_steps": 2,
        "checkpoint.every": 3,
        "optim.warmup_steps": 2,
        "mesh.data": -1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(args: list[str], *, devices: int | None = 8, timeout: int = 300) -> subprocess.CompletedProcess:
    """`devices=None`: no device count in XLA_FLAGS, so the job claims its CPU devices as a user's would."""
    env = dict(os.environ)
    # conftest's flags (optimization level) with this run's device count
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    count = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    env["XLA_FLAGS"] = " ".join([*flags, *count])
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", "flaxpod.train.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
