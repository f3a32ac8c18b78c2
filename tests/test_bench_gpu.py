"""tools/bench_gpu.py end to end on CPU with a tiny model: the tables it writes, the packed-row check, and
cuDNN recorded as unavailable instead of crashing the bench."""

from __future__ import annotations

import json

import pytest

from tools import bench_gpu

FLOAT32 = ["model.dtype=float32"]  # bench_gpu's bfloat16 compute, back to float32 for 1e-5 comparisons
TINY = ["--tiny", "--seq", "16", "--batch", "2", "--steps", "1", "--warmup", "1"]


def results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def test_bench_writes_both_tables_and_checks_packed_rows(tmp_path):
    bench_gpu.main(["--out", str(tmp_path), *TINY, "--remat", "none", "--loss-chunk", "8", "--no-isolate"] + FLOAT32)
    got = results(tmp_path)
    rows = {(r["attention"], r["remat"], r["loss_chunk"]): r for r in got["rows"]}
    plain = {("einsum", "none", 0), ("xla", "none", 0), ("cudnn", "none", 0)}
    assert plain < set(rows) and len(rows) == 4  # the three kernels, then the best one with loss_chunk=8
    for key in ("einsum", "none", 0), ("xla", "none", 0):
        row = rows[key]
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] > 0
        assert row["mfu_with_head"] > row["mfu"] > 0 and row["peak_gib"] is None  # CPU has no memory_stats
    assert "cuDNN" in rows["cudnn", "none", 0]["status"]
    # The best combo again with the chunked loss: the same model and batches give the same first loss.
    chunked = next(r for k, r in rows.items() if k[2] == 8)
    assert chunked["status"] == "ok"
    assert abs(chunked["first_loss"] - rows[chunked["attention"], "none", 0]["first_loss"]) < 1e-5
    # fused/xla equals einsum on packed rows (segment ids) and on plain causal rows (is_causal, no mask).
    packed = got["packed_check"]
    for kind in ("packed", "causal"):
        xla = packed["implementations"]["xla"][kind]
        assert xla["status"] == "ok" and xla["loss_diff"] <= 1e-5 and xla["grad_rel_diff"] <= 1e-5
        assert packed["implementations"]["cudnn"][kind]["status"].startswith("unavailable: ")
    assert packed["documents_leaking_loss_change"] > 1e-4  # the check would see a kernel ignoring segment ids
    table = (tmp_path / "results.md").read_text()
    header = "| " + " | ".join(title for _, title in bench_gpu.COLUMNS) + " |"
    assert header in table and "989" in table and "n/a" in table
    assert table.count("\n| einsum | none | 0 | ") == 1
    assert "| xla | packed | ok, same |" in table and "| xla | causal | ok, same |" in table


@pytest.mark.slow
def test_isolated_combos_record_a_failing_child(tmp_path):
    """The default mode: each combo in its own process; the cuDNN child fails and leaves its error line."""
    bench_gpu.main(
        ["--out", str(tmp_path), *TINY, "--attention", "einsum,cudnn", "--remat", "none"]
        + ["--loss-chunk", "0", "--no-packed-check"]
    )
    rows = {r["attention"]: r for r in results(tmp_path)["rows"]}
    assert rows["einsum"]["status"] == "ok" and rows["einsum"]["first_loss"] > 0
    assert rows["cudnn"]["status"].startswith("failed (exit 1): ") and "cuDNN" in rows["cudnn"]["status"]
