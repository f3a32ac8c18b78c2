"""Checkpoint costs against training: how long a save blocks the loop, how much slower steps get
while a save is written in the background, how long restores take, and how big a checkpoint is.

    python -m tools.bench_checkpoint configs/tiny.yaml
    python -m tools.bench_checkpoint configs/gpt2_124m.yaml model.n_layer=4 --saves 3

For each config: the train step of `flaxpod pretrain` on random tokens over all devices; then
`--saves` asynchronous saves, each followed by `--steps` training steps that run while the save is
written; a synchronous save; a full restore (params + optimizer state, resharded onto the mesh)
and a params-only restore. Times are medians. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flaxpod.train.checkpoint import Checkpointer, directory_bytes, params_bytes
from flaxpod.train.config import load_config
from flaxpod.train.run_dir import restore_params
from flaxpod.train.trainer import Trainer


def timed_steps(step_fn, state, batch, n: int):
    """Runs n steps; (state, seconds per step)."""
    start = time.perf_counter()
    for _ in range(n):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / n


def bench(config: str, overrides: list[str], *, saves: int, steps: int) -> dict[str, float | str]:
    cfg = load_config(config, overrides)
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = 4096  # no tokenizer here: the size a small SentencePiece model has
    cfg.model.max_seq_len = cfg.model.max_len
    trainer = Trainer.from_config(cfg)
    step_fn, layout = trainer.step, trainer.layout
    tokens = np.random.default_rng(0).integers(
        0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.model.seq_len + 1), dtype=np.int32
    )
    batch = trainer.put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state = trainer.init_state(cfg.seed)
    state, _ = timed_steps(step_fn, state, batch, 3)  # compile and warm up
    plain, during, blocked, written = [], [], [], []
    with tempfile.TemporaryDirectory() as run_dir:
        ck = Checkpointer(run_dir, keep=2)
        for i in range(saves):
            state, seconds = timed_steps(step_fn, state, batch, steps)
            plain.append(seconds)
            start = time.perf_counter()
            blocked.append(ck.save(i + 1, state, {"index": i}))
            state, seconds = timed_steps(step_fn, state, batch, steps)
            during.append(seconds)
            ck.wait()
            written.append(ck.committed_at - start)
        start = time.perf_counter()
        ck.save(saves + 1, state, {"index": saves}, wait=True)
        sync_save = time.perf_counter() - start
        ck.close()
        size = directory_bytes(Path(run_dir) / "checkpoints" / str(saves + 1))

        start = time.perf_counter()
        reader = Checkpointer(run_dir, keep=2)
        restored = reader.restore_latest(layout)
        jax.block_until_ready(restored.state)
        restore = time.perf_counter() - start
        reader.close()
        start = time.perf_counter()
        params, _ = restore_params(run_dir, target=layout)
        jax.block_until_ready(params)
        restore_params_s = time.perf_counter() - start
    med = statistics.median
    return {
        "config": " ".join([Path(config).name, *overrides]) or config,
        "params_M": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
        "params_MB": params_bytes(state.params) / 1e6,
        "state_MB": params_bytes(state) / 1e6,
        "ckpt_MB": size / 1e6,
        "step_ms": 1e3 * med(plain),
        "step_during_save_ms": 1e3 * med(during),
        "save_blocks_ms": 1e3 * med(blocked),
        "async_write_s": med(written),
        "sync_save_s": sync_save,
        "restore_s": restore,
        "restore_params_s": restore_params_s,
    }


COLUMNS = [
    ("config", "config", "{}"),
    ("params_M", "params (M)", "{:.2f}"),
    ("params_MB", "param MB", "{:.1f}"),
    ("state_MB", "state MB", "{:.1f}"),
    ("ckpt_MB", "ckpt MB", "{:.1f}"),
    ("step_ms", "step ms", "{:.1f}"),
    ("save_blocks_ms", "save blocks ms", "{:.1f}"),
    ("step_during_save_ms", "step ms while writing", "{:.1f}"),
    ("async_write_s", "async save to commit s", "{:.2f}"),
    ("sync_save_s", "sync save s", "{:.2f}"),
    ("restore_s", "restore s", "{:.2f}"),
    ("restore_params_s", "params-only restore s", "{:.2f}"),
]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="+", help="CONFIG.yaml [key=value ...]; separate configs with ';'")
    parser.add_argument("--saves", type=int, default=3, help="asynchronous saves to time (median)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per save")
    args = parser.parse_args(argv)
    runs, current = [], []
    for word in args.config:
        if word == ";":
            runs.append(current)
            current = []
        else:
            current.append(word)
    runs.append(current)
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); {args.saves} saves, {args.steps} steps each")
    rows = []
    for run in filter(None, runs):
        rows.append(bench(run[0], run[1:], saves=args.saves, steps=args.steps))
        print(table(rows[-1:]), flush=True)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
