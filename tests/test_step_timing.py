"""The loop's throughput window (tokens/s, ms/step, MFU, ETA) counts training time only: with a fake clock
on which every step takes 1 s and every evaluation 1000 s, every logged row must say 1 s per step, including
the row after an evaluation that fell between two logs."""

from __future__ import annotations

import json
import types

import pytest
from flaxpod.train import loop
from flaxpod.train.config import load_config
from flaxpod.train.trainer import Trainer

from tests.helpers import REPO, tiny_overrides, write_corpus


def test_logged_step_time_excludes_evaluation(tmp_path, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    put, evaluate = Trainer.put, Trainer.evaluate

    def put_one_second(self, batch):  # one call per training step (and per evaluation batch, inside evaluate)
        clock["now"] += 1.0
        return put(self, batch)

    def slow_evaluate(self, params, batches):
        saved = clock["now"]
        result = evaluate(self, params, batches)
        clock["now"] = saved + 1000.0
        return result

    monkeypatch.setattr(Trainer, "put", put_one_second)
    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    run_dir = tmp_path / "run"
    # logs at 2, 4, 6; evaluations at 3 and 6: the row at 4 spans an evaluation. Only the final checkpoint
    # (its blocking time, measured on the real clock, is taken out of the window as well).
    extra = {"train.eval_every": 3, "checkpoint.every": 1000}
    overrides = tiny_overrides(run_dir, write_corpus(tmp_path / "corpus.txt"), **extra)
    loop.run_pretraining(load_config(REPO / "configs" / "tiny.yaml", overrides))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [(r["step"], r["step_time"]) for r in rows if "step_time" in r]
    assert [s for s, _ in timed] == [2, 4, 6]
    assert [t for _, t in timed] == pytest.approx([1.0, 1.0, 1.0])
