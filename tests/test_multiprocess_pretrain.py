"""Two processes x 4 devices through the launcher train exactly like one process x 8 devices."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import run_cli, tiny_overrides, write_corpus


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, products",
    # data-parallel: each process's 4 devices (one per core and more) multiply through OpenBLAS
    # (sharding/cpu_matmul.py), and the weight gradients are summed across the processes
    [((2, 2, 2), "XLA's"), ((8, 1, 1), "OpenBLAS sgemm, one thread per device")],
)
def test_two_processes_match_one(tmp_path, mesh_shape, products):
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=20_000)
    data, fsdp, tensor = mesh_shape
    mesh = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "train.steps": 4, "train.log_every": 1}
    single = tmp_path / "single"
    one = run_cli(["pretrain", "configs/tiny.yaml", *tiny_overrides(single, corpus, **mesh)])
    assert one.returncode == 0, one.stderr[-3000:]

    multi = tmp_path / "multi"
    two = run_cli(
        [
            "launch",
            "--num-processes",
            "2",
            "--devices-per-process",
            "4",
            "--",
            sys.executable,
            "-m",
            "flaxpod.train.pretrain",
            "configs/tiny.yaml",
            *tiny_overrides(multi, corpus, **mesh),
        ]
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    assert "[p0] " in two.stdout and "[p1] " in two.stdout
    assert "over 8 devices in 2 process(es)" in two.stdout
    line = f"CPU matrix products and attention: {products} (mesh.cpu_matmul=auto)"
    assert line in one.stdout and f"[p0] {line}" in two.stdout
    # Only process 0 writes metrics and logs its progress.
    assert "[p1] step" not in two.stdout
    single_train, single_val = losses(single)
    multi_train, multi_val = losses(multi)
    assert len(single_train) == len(multi_train) == 4
    assert multi_train == pytest.approx(single_train, abs=1e-5)
    assert multi_val == pytest.approx(single_val, abs=1e-5)
    assert (multi / "checkpoints" / "4").exists()
