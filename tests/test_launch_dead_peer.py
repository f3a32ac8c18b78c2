"""A peer that dies mid-run (SIGKILL, as a lost host) never leaves the survivor hanging.

Under `flaxpod launch` the launcher sees the death, sends the survivor SIGTERM and, after
--grace-period seconds, SIGKILL: the job ends within that bound with status 137 (128 + SIGKILL of the
dead one). Without the launcher (processes started by hand or by a scheduler), JAX's coordination
service stops hearing the dead peer's heartbeats and aborts the survivor after
FLAXPOD_HEARTBEAT_TIMEOUT_S seconds (JAX's default: 100): status 134 (SIGABRT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flaxpod.sharding.launch import free_port

from tests.helpers import REPO, tiny_overrides, write_corpus

GRACE_S = 3
HEARTBEAT_S = 5
SLACK_S = 10  # a loaded 2-core machine: signal delivery, Python shutdown


def endless_run(tmp_path: Path) -> list[str]:
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=20_000)
    overrides = tiny_overrides(tmp_path / "run", corpus, **{"train.steps": 100_000, "train.log_every": 1,
                                                           "train.eval_every": 0, "checkpoint.every": 0})  # fmt: skip
    return [sys.executable, "-m", "flaxpod.train.pretrain", "configs/tiny.yaml", *overrides]


def wait_for_steps(run_dir: Path, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert all(p.poll() is None for p in procs), "a process ended before training started"
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)


def child_env(devices: int = 4) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAXPOD_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env.update(XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]), JAX_PLATFORMS="cpu")
    return env


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"FLAXPOD_PROCESS_ID="):
            return int(item.split(b"=", 1)[1])
    return None


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_launcher_stops_the_survivor_within_its_grace_period(tmp_path):
    command = endless_run(tmp_path)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flaxpod.train.cli", "launch", "--num-processes", "2", "--devices-per-process", "4",
         "--grace-period", str(GRACE_S), "--", *command],
        env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_steps(tmp_path / "run", [launcher])
        (victim,) = [pid for pid in children_of(launcher.pid) if rank_of(pid) == 1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        output = launcher.communicate(timeout=GRACE_S + SLACK_S + 60)[0]
        took = time.monotonic() - killed_at
    finally:
        launcher.kill()
    print(f"launcher: exit {launcher.returncode} {took:.1f} s after SIGKILL of process 1")
    assert launcher.returncode == 128 + signal.SIGKILL
    assert "process 1 was killed by signal SIGKILL; stopping 1 other process(es)" in output
    assert took < GRACE_S + SLACK_S


@pytest.mark.slow
def test_without_a_launcher_the_heartbeat_timeout_aborts_the_survivor(tmp_path):
    command = endless_run(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for rank in range(2):
        env = child_env()
        env.update(FLAXPOD_NUM_PROCESSES="2", FLAXPOD_PROCESS_ID=str(rank), FLAXPOD_COORDINATOR_ADDRESS=address)
        env["FLAXPOD_HEARTBEAT_TIMEOUT_S"] = str(HEARTBEAT_S)
        procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        wait_for_steps(tmp_path / "run", procs)
        # Process 1, not the coordinator: a dead coordinator is noticed at once (the survivors lose
        # their connection to it); a dead worker only by its missing heartbeats, the slow case.
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        procs[0].wait(timeout=HEARTBEAT_S + SLACK_S + 60)
        took = time.monotonic() - killed_at
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    print(f"survivor: exit {procs[0].returncode} {took:.1f} s after SIGKILL of process 1")
    assert procs[0].returncode not in (0, None)
    assert took < HEARTBEAT_S + SLACK_S


def test_heartbeat_timeout_reaches_jax_only_when_set(monkeypatch):
    import jax
    from flaxpod.sharding import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for name in ("FLAXPOD_NUM_PROCESSES", "FLAXPOD_PROCESS_ID", "FLAXPOD_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLAXPOD_AUTO_DISTRIBUTED", "1")
    monkeypatch.delenv("FLAXPOD_HEARTBEAT_TIMEOUT_S", raising=False)
    distributed.initialize_from_env()
    monkeypatch.setenv("FLAXPOD_HEARTBEAT_TIMEOUT_S", "7")
    distributed.initialize_from_env()
    assert calls == [{}, {"heartbeat_timeout_seconds": 7}]
    monkeypatch.setenv("FLAXPOD_HEARTBEAT_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="FLAXPOD_HEARTBEAT_TIMEOUT_S must be an integer >= 1, got '0'"):
        distributed.initialize_from_env()
