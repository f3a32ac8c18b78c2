"""metrics.jsonl on resume: rows a killed run wrote after the resumed step are dropped."""

from __future__ import annotations

import json

from flaxpod.train.metrics import MetricsWriter


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _killed_run(run_dir) -> None:
    """Rows up to step 40 (eval rows beside train rows), then a line cut short by the kill."""
    rows = [{"step": s, "loss": 10.0 - s / 10} for s in (10, 20, 30, 40)] + [{"step": 20, "val_loss": 8.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 50, "lo'
    (run_dir / "metrics.jsonl").write_text(text)


def test_resume_drops_rows_after_the_resumed_step(tmp_path):
    _killed_run(tmp_path)
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=20)
    writer.write(30, {"loss": 7.0})
    writer.close()
    assert _rows(tmp_path / "metrics.jsonl") == [
        {"step": 10, "loss": 9.0},
        {"step": 20, "loss": 8.0},
        {"step": 20, "val_loss": 8.5},
        {"step": 30, "loss": 7.0},
    ]


def test_fresh_start_over_old_rows_keeps_none_and_other_processes_touch_nothing(tmp_path):
    _killed_run(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    MetricsWriter(tmp_path, enabled=False, tensorboard=False, resume_step=20).close()  # not process 0
    assert (tmp_path / "metrics.jsonl").read_text() == before
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
