"""The SLURM path for real: 2 processes with the environment srun gives its tasks join through
jax.distributed.initialize()'s own SLURM detection (FLAXPOD_AUTO_DISTRIBUTED=1), on a 2-slice mesh
(mesh.dcn_data=2: one "node" per process), and train exactly like 1 process x 8 devices."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_cli, tiny_overrides, write_corpus

# jax 0.10's SlurmCluster puts the coordinator on the first node of SLURM_STEP_NODELIST, port
# 61440 + SLURM_JOB_ID % 4096 (unless JAX_COORDINATOR_PORT is set): pick a free port in that range
# and the job id that maps to it.
SLURM_PORT_BASE = 65535 - 2**12 + 1


def free_slurm_port() -> int:
    for port in random.Random(os.getpid()).sample(range(SLURM_PORT_BASE, 65536), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))  # the coordinator listens on every address
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in SLURM's coordinator range")


def srun_task_env(rank: int, ntasks: int, job_id: int) -> dict[str, str]:
    """What srun sets for task `rank` of a one-node step (the variables JAX reads, and their usual company)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLAXPOD_", "SLURM_", "JAX_COORDINATOR"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env.update(
        XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=4"]),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        FLAXPOD_AUTO_DISTRIBUTED="1",
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NODELIST="localhost",
        SLURM_STEP_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_STEP_NUM_NODES="1",
        SLURM_NTASKS=str(ntasks),
        SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODEID="0",
    )
    return env


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.slow
def test_two_slurm_tasks_match_one_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=20_000)
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.steps": 3, "train.log_every": 1}
    # Fewer programs to compile on a shared 2-core machine: one evaluation (at the end), one batch.
    mesh.update({"train.eval_every": 0, "train.eval_steps": 1, "checkpoint.every": 0})
    single = tmp_path / "single"
    one = run_cli(["pretrain", "configs/tiny.yaml", *tiny_overrides(single, corpus, **mesh)])
    assert one.returncode == 0, one.stderr[-3000:]

    multi = tmp_path / "multi"
    command = [sys.executable, "-m", "flaxpod.train.pretrain", "configs/tiny.yaml"]
    command += tiny_overrides(multi, corpus, **mesh, **{"mesh.dcn_data": 2})
    job_id = free_slurm_port() - SLURM_PORT_BASE
    tasks = [
        subprocess.Popen(command, env=srun_task_env(rank, 2, job_id), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]  # fmt: skip
    try:
        outputs = [task.communicate(timeout=240)[0] for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    assert [t.returncode for t in tasks] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "over 8 devices in 2 process(es)" in outputs[0]
    single_train, single_val = losses(single)
    multi_train, multi_val = losses(multi)
    assert len(single_train) == len(multi_train) == 3
    assert multi_train == pytest.approx(single_train, abs=1e-5)
    assert multi_val == pytest.approx(single_val, abs=1e-5)
