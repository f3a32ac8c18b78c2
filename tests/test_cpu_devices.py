"""One CPU device per core (sharding/cpu_devices.py): how many devices a training job claims, when it leaves
the count alone, and that a run on claimed devices trains the same model as one on JAX's single CPU device."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from flaxpod.sharding import cpu_devices
from flaxpod.sharding.cpu_devices import KEEP_BARRIERS, ONE_THREAD_OPTIONS, auto_cpu_device_count, claim_cpu_devices
from flaxpod.sharding.mesh import build_mesh
from flaxpod.train import dispatch
from flaxpod.train.config import ConfigError, MeshConfig, load_config

from tests.helpers import REPO, run_cli, tiny_overrides, write_corpus


@pytest.mark.parametrize(
    ("mesh", "micro_batch", "cores", "expected"),
    [
        (MeshConfig(), 12, 2, 2),  # nanoGPT's CPU batch on two cores
        (MeshConfig(), 7, 2, 1),  # a batch two devices cannot split evenly
        (MeshConfig(), 12, 8, 6),  # the most devices, at most one per core, that split 12 rows
        (MeshConfig(), 64, 64, cpu_devices.MAX_AUTO_CPU_DEVICES),  # capped
        (MeshConfig(), 2, 8, 2),  # never more devices than rows
        (MeshConfig(data=-1, fsdp=2), 12, 8, 6),  # a multiple of the fixed axes
        (MeshConfig(data=-1, tensor=2), 4, 8, 8),  # the tensor axis takes no rows: 4 rows over data=4
        (MeshConfig(data=2, fsdp=2), 12, 2, 4),  # every axis fixed: their product
        (MeshConfig(data=2, tensor=-1), 12, 8, None),  # the open axis is tensor: left alone
    ],
)
def test_auto_count(mesh, micro_batch, cores, expected):
    assert auto_cpu_device_count(mesh, micro_batch, cores) == expected


def test_claim_leaves_a_count_set_in_xla_flags():
    # conftest put --xla_force_host_platform_device_count=8 in XLA_FLAGS (and the backend is running).
    assert claim_cpu_devices(load_config(None, ["mesh.cpu_devices=3"])) is None
    assert jax.device_count() == 8


def test_negative_cpu_devices_is_a_config_error():
    with pytest.raises(ConfigError, match=r"mesh.cpu_devices: expected 0 .* got -1"):
        load_config(None, ["mesh.cpu_devices=-1"])


def test_claim_in_a_fresh_process():
    """A process whose XLA_FLAGS names no count: the claim sets JAX's CPU device count before the backend
    starts, and a second claim (the backend running) changes nothing."""
    code = textwrap.dedent(
        """
        import json, jax
        from flaxpod.sharding.cpu_devices import auto_cpu_device_count, claim_cpu_devices, usable_cores
        from flaxpod.train.config import load_config
        explicit = claim_cpu_devices(load_config(None, ["mesh.cpu_devices=3"]))
        count = jax.device_count()
        again = claim_cpu_devices(load_config(None, ["mesh.cpu_devices=5"]))
        print(json.dumps([explicit, count, again, jax.device_count()]))
        """
    )
    flags = " ".join(f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f)
    env = {**os.environ, "XLA_FLAGS": flags}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [3, 3, None, 3]


def test_one_thread_options_only_when_each_core_has_a_device(monkeypatch):
    eight = build_mesh(8, 1, 1, devices=jax.devices())
    one = build_mesh(1, 1, 1, devices=jax.devices()[:1])
    monkeypatch.setattr(cpu_devices, "usable_cores", lambda: 2)
    assert cpu_devices.cpu_compiler_options(eight) == {**KEEP_BARRIERS, **ONE_THREAD_OPTIONS}
    assert cpu_devices.cpu_compiler_options(one) == KEEP_BARRIERS  # a lone device keeps XLA's thread pool
    monkeypatch.setattr(cpu_devices, "usable_cores", lambda: 16)
    assert cpu_devices.cpu_compiler_options(eight) == KEEP_BARRIERS


def test_pretrain_on_claimed_devices_matches_one_device(tmp_path):
    """`flaxpod pretrain` as a user runs it (no device count in the environment): with mesh.cpu_devices=2 the
    run splits its batch over two single-threaded devices, and its losses equal those of the same run on
    JAX's one CPU device to float rounding (the gradient is summed in a different order)."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    losses = {}
    for count in (1, 2):
        run_dir = tmp_path / f"run{count}"
        result = run_cli(
            ["pretrain", "configs/tiny.yaml", *tiny_overrides(run_dir, corpus, **{"mesh.cpu_devices": count})],
            devices=None,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"mesh data={count} fsdp=1 tensor=1 over {count} devices" in result.stdout + result.stderr
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[count] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses[2]] == [s for s, _ in losses[1]] and len(losses[1]) >= 3
    for (_, two), (_, one) in zip(losses[2], losses[1], strict=True):
        assert two == pytest.approx(one, rel=1e-5)


def test_kept_barriers_stop_the_residual_gradient_fusing_across_layers():
    """The model's gradient barrier (model/transformer.gradient_barrier) with KEEP_BARRIERS: the widest
    fusion of a 6-layer model's gradient is one block's, where XLA:CPU's default drops the barrier and fuses
    the residual gradient of all later layers into each layer's fusion (36 against 120 operands here)."""
    from flax import nnx
    from flaxpod.model.config import ModelConfig
    from flaxpod.model.transformer import Transformer

    cfg = ModelConfig(n_layer=6, n_head=4, d_model=64, seq_len=32, vocab_size=64, bias=False, scan_layers=False)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 64)
    grad = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)))

    def widest_fusion(options: dict) -> int:
        text = grad.lower(params).compile(compiler_options=options).as_text()
        entry = text[text.index("\nENTRY") :]
        return max(m.group(1).count("%") for m in re.finditer(r"= \S+ fusion\((.*?)\), kind", entry))

    kept, dropped = widest_fusion({**KEEP_BARRIERS, **ONE_THREAD_OPTIONS}), widest_fusion(ONE_THREAD_OPTIONS)
    assert kept <= 40 and dropped > 2 * kept, (kept, dropped)


def test_a_long_log_interval_does_not_run_the_host_out_of_admissions(tmp_path):
    """A run that fetches its metrics only every 80 steps, on 8 CPU devices: XLA's CPU client admits 32
    computations per device ahead of the host, and a host that dispatched further deadlocked the devices at
    the step's all-reduce (XLA aborts the process after its 60-second rendezvous timeout; 3 of 3 runs before
    train/dispatch.py). The loop keeps the host a few steps ahead; the run finishes and logs its one row."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    run_dir = tmp_path / "run"
    # steps long enough (tens of ms) that the host's dispatch outruns them
    shape = {"model.n_layer": 4, "model.d_model": 128, "model.seq_len": 64, "data.batch_size": 16}
    steps = {"train.steps": 80, "train.log_every": 80, "train.eval_every": 80, "checkpoint.every": 80}
    result = run_cli(["pretrain", "configs/tiny.yaml", *tiny_overrides(run_dir, corpus, **shape, **steps)], timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [80]


def test_step_window_waits_for_the_step_dispatched_ahead_steps_before(monkeypatch):
    waited = []
    monkeypatch.setattr(dispatch, "jax", SimpleNamespace(block_until_ready=waited.append))
    window = dispatch.StepWindow(ahead=2)
    for step in range(1, 6):
        window.dispatched({"loss": step})
    assert waited == [{"loss": 1}, {"loss": 2}, {"loss": 3}]  # after steps 3, 4, 5: never more than 2 in flight
    with pytest.raises(ValueError, match="ahead must be at least 1, got 0"):
        dispatch.StepWindow(ahead=0)
