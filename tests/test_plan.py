"""`flaxpod plan`: targets, the TPU compiler through libtpu (CI installs the `plan` extra), the CPU
estimate checked against the layout's own bytes, FLOPs against an unrolled step, and the verdict."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from flaxpod.model.errors import InputError
from flaxpod.train.checkpoint_files import abstract
from flaxpod.train.config import load_config
from flaxpod.train.plan import main as plan_main
from flaxpod.train.planner import EXIT_DOES_NOT_FIT, abstract_batch, plan, resolve_for_plan, step_flops
from flaxpod.train.targets import GiB, parse_target
from flaxpod.train.trainer import Trainer

from tests.helpers import REPO, run_cli

CONFIG = str(REPO / "configs" / "tiny.yaml")
SMALL = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.seq_len=32",
    "model.vocab_size=256",
    "data.batch_size=8",
]


def small(*extra: str):
    return load_config(CONFIG, [*SMALL, *extra])


def test_targets_match_cloud_slice_shapes():
    # Shapes and chip counts as Google Cloud provisions them (MaxText's accelerator table).
    expected = {
        "v5p-128": ("v5:4x4x4", 64, "megacore"),
        "v5p-512": ("v5:4x8x8", 256, "megacore"),
        "v4-8": ("v4:2x2x1", 4, "megacore"),
        "v4-32": ("v4:2x2x4", 16, "megacore"),
        "v5e-16": ("v5e:4x4", 16, "default"),
        "v5litepod-128": ("v5e:8x16", 128, "default"),
        "v6e-256": ("v6e:16x16", 256, "default"),
        "v5p:4x4x12": ("v5:4x4x12", 192, "megacore"),
    }
    for name, (topology, chips, config) in expected.items():
        target = parse_target(name)
        assert (target.topology, target.chips, target.chip_config, target.platform) == (topology, chips, config, "tpu")
    with pytest.raises(InputError, match="several TPU slices"):
        parse_target("4xv5e-256")
    gpu = parse_target("2xH200x8")
    assert (gpu.platform, gpu.chips, gpu.chip.hbm_bytes) == ("cpu", 16, 141 * 10**9)
    assert parse_target("v5e-16").chip.hbm_bytes == 16 * GiB
    for bad in ("v5p-100", "v9-8", "tpu", "h100"):
        with pytest.raises(InputError, match="--target"):
            parse_target(bad)


def state_and_batch_bytes(cfg, devices) -> tuple[int, int]:
    """Bytes one device holds of the state and of a batch, from shard shapes (the reference)."""
    trainer = Trainer.from_config(resolve_for_plan(cfg), devices=devices)

    def per_device(tree) -> int:
        return sum(
            math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
        )

    state = abstract(trainer.layout.shapes, trainer.layout.shardings)
    return per_device(state), per_device(abstract_batch(resolve_for_plan(cfg), trainer))


def test_cpu_estimate_arguments_are_exactly_the_sharded_state_and_batch():
    cfg = small("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    report = plan(cfg, parse_target("h100x8"))
    state, batch = state_and_batch_bytes(cfg, jax.devices()[:8])
    assert report.cpu_estimate and report.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
    assert report.arguments == state + batch
    assert report.aliased == state  # the whole state is donated and updated in place
    assert report.peak == report.arguments + report.outputs - report.aliased + report.temporaries + report.code
    assert report.fits and report.hbm_bytes == 80 * 10**9
    # Llama block: attention q,o (d*d each) + k,v (d*d/2 each with 2 of 4 heads) + SwiGLU (3*d*d_ff)
    # + two RMSNorm scales; plus the final norm and the tied embedding.
    d, d_ff = 64, 192  # the Llama rule: 8/3*64 rounded up to a multiple of 64 (model/transformer.py)
    block = 3 * d * d + 3 * d * d_ff + 2 * d
    assert report.params == 2 * block + d + 256 * d
    assert report.params_nonembedding == 2 * block + d


def test_tpu_compiler_plans_a_small_slice():
    """The TPU path proper: libtpu describes a v5e-4 slice and its compiler compiles the step."""
    cfg = small("mesh.data=1", "mesh.fsdp=-1")
    report = plan(cfg, parse_target("v5e-4"))
    assert not report.cpu_estimate and report.compiler.startswith("TPU compiler")
    assert report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    # TPU buffers are padded to its tiles, so the arguments hold at least the sharded state + batch.
    state, batch = state_and_batch_bytes(cfg, jax.devices()[:4])
    assert state + batch <= report.arguments < 4 * (state + batch)
    assert report.aliased >= state and report.fits and report.hbm_bytes == 16 * GiB
    assert report.peak > report.arguments


def test_step_flops_extrapolate_to_the_unrolled_step():
    cfg = resolve_for_plan(small("model.n_layer=4", "model.remat=full"))
    devices = jax.devices()[:8]
    unrolled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
    unrolled = dataclasses.replace(unrolled, mesh=dataclasses.replace(cfg.mesh, cpu_matmul="xla"))  # counted dots
    trainer = Trainer.from_config(unrolled, devices=devices)
    lowered = trainer.step.lower(
        abstract(trainer.layout.shapes, trainer.layout.shardings), abstract_batch(cfg, trainer)
    )
    # Not to the last FLOP: 452,285,568 vs 452,581,152 here (a few bookkeeping ops do not grow linearly).
    assert step_flops(cfg, devices) == pytest.approx(lowered.cost_analysis()["flops"], rel=1e-3)


def test_verdict_exit_code_advice_and_json(capsys):
    args = [CONFIG, *SMALL, "data.batch_size=32", "model.remat=none", "--target", "h100x8"]
    assert plan_main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["chips"] == 8 and report["peak"] > 0
    assert report["mfu"] == pytest.approx(report["model_flops_per_step"] / report["flops_per_step"])
    # Room for the state and half the temporaries: activations must shrink by 2, so the advice is
    # to halve the micro-batch (4 rows per data-parallel shard: 32 rows over data=8).
    hbm = report["arguments"] + report["temporaries"] // 2
    assert plan_main([*args, "--hbm", str(hbm)]) == EXIT_DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "CPU-compiler estimate" in out
    assert "largest state buffers / device:" in out and "largest arrays of the compiled step" in out
    assert "model.remat=full" in out and "train.grad_accum=2: the micro-batch goes from 4 to 2 rows" in out


def test_gpu_target_larger_than_this_process_plans_in_a_child():
    # The test process has 8 devices; 2 hosts of 8 GPUs need 16, so plan starts a child with 16.
    result = run_cli(["plan", CONFIG, *SMALL, "data.batch_size=16", "--target", "2xh100x8", "--json"], devices=1)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["chips"] == 16 and report["mesh"]["data"] == 16 and report["cpu_estimate"]


def test_bad_target_is_one_line_exit_2(capsys):
    assert plan_main([CONFIG, "--target", "v5p-100"]) == 2
    assert capsys.readouterr().err.startswith("error: --target")
