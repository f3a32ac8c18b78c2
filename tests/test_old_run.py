"""A run directory written before the one-trainer refactor (tests/fixtures/run_v0, made by that code)
still resumes bit for bit, evaluates and exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from flaxpod.train.objectives import lm_logits
from flaxpod.train.run_dir import load_run, restore_params, single_device_mesh
from transformers import AutoModelForCausalLM

from tests.helpers import run_cli
from tests.tiny_setup import assert_bitwise_equal

FIXTURES = Path(__file__).parent / "fixtures"


def rows(run_dir: Path, key: str) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


@pytest.mark.slow
def test_old_run_resumes_bit_for_bit_and_exports(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_v0", run)
    old_losses, old_norms = rows(run, "loss"), rows(run, "grad_norm")
    old_step4, _ = restore_params(run, 4)
    shutil.rmtree(run / "checkpoints" / "4")  # resume from step 2, as the old code would have

    overrides = [f"run_dir={run}", f"data.path={FIXTURES / 'run_v0_corpus.txt'}"]
    result = run_cli(["pretrain", str(run / "config.yaml"), *overrides], devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    for step in (3, 4):  # the same floats, bit for bit, as the old code logged
        assert rows(run, "loss")[step] == old_losses[step]
        assert rows(run, "grad_norm")[step] == old_norms[step]
    new_step4, _ = restore_params(run, 4)
    assert_bitwise_equal(new_step4, old_step4)

    out = tmp_path / "hf"
    result = run_cli(["export", str(run), "--out", str(out)], devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_run(run, mesh=single_device_mesh())
    tokens = np.array([loaded.tokenizer.encode("the quick brown fox")], np.int32)
    ours = np.asarray(
        jax.jit(lambda p: lm_logits(nnx.merge(loaded.graphdef, p), {"inputs": tokens}, None))(loaded.params)
    )
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(tokens, dtype=torch.long)).logits
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4)
