"""Loader throughput on prepared shards: tokens/s and packing efficiency.

    python -m tools.bench_loader DATASET_DIR SEQ_LEN BATCH [--steps N]
        [--warmup 10] [--worker-processes 0] [--shuffle-window-rows 1024] [--prefetch 4]

Builds the training iterator of `data.prepared` exactly as training does (one process),
takes `--warmup` batches, then times `--steps` batches (by default enough for 4 row
shuffle windows and at least 200, since the window fills in bursts). Prints slots/s (batch * seq_len
per second), real tokens/s (positions with loss_mask 1, i.e. slots/s times the packing
efficiency), the packing efficiency, and the time to the first batch. Several
comma-separated dataset directories are mixed with equal weights.

With `--train-config CONFIG.yaml` it also times that config's real train step (train.step, one
process, all local devices, random tokens of the same seq_len, `--train-batch` rows) and prints
the tokens/s training consumes next to the loader's, with their ratio: the loader must stay far
ahead of training. E.g. `--train-config configs/gpt2_124m.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
from flaxpod.data.prepared import load_dataset_metadata, make_packed_train_iterator


def bench(
    dataset_dirs: list[str],
    seq_len: int,
    batch: int,
    *,
    steps: int | None = None,
    warmup: int = 10,
    worker_processes: int = 0,
    shuffle_window_rows: int = 1024,
    prefetch: int = 4,
    seed: int = 0,
) -> dict:
    """Times the training iterator; returns the figures `main` prints."""
    if steps is None:
        steps = max(200, -(-4 * shuffle_window_rows // batch))
    start = time.perf_counter()
    it = make_packed_train_iterator(
        dataset_dirs,
        seq_len=seq_len,
        global_batch_size=batch,
        seed=seed,
        worker_processes=worker_processes,
        shuffle_window_rows=shuffle_window_rows,
        prefetch_batches=prefetch,
    )
    try:
        next(it)
        first = time.perf_counter() - start
        for _ in range(warmup):
            next(it)
        real = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            real += float(np.sum(next(it)["loss_mask"]))
        seconds = time.perf_counter() - start
    finally:
        it.close()
    slots = steps * batch * seq_len
    return {
        "steps": steps,
        "seconds": seconds,
        "slots_per_sec": slots / seconds,
        "tokens_per_sec": real / seconds,
        "packing_efficiency": real / slots,
        "first_batch_seconds": first,
    }


def training_tokens_per_sec(config_path: str, seq_len: int, rows: int, steps: int = 2) -> float:
    """Tokens/s of the config's compiled train step on this machine (compile excluded)."""
    import jax
    from flaxpod.train.config import load_config
    from flaxpod.train.dispatch import StepWindow
    from flaxpod.train.trainer import Trainer

    n = jax.device_count()
    cfg = load_config(
        config_path,
        [
            f"model.seq_len={seq_len}",
            f"data.batch_size={rows}",
            "train.grad_accum=1",
            f"mesh.data={n}",
            "mesh.fsdp=1",
            "mesh.tensor=1",
        ],
    )
    model_cfg = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=32768)
    model_cfg = dataclasses.replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, seq_len))
    trainer = Trainer.from_config(dataclasses.replace(cfg, model=model_cfg))
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (rows, seq_len + 1)).astype(np.int32)
    batch = trainer.put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state = trainer.init_state(0)
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    start, window = time.perf_counter(), StepWindow()  # the host runs ahead as train/loop.py's does
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
        window.dispatched(metrics)
    jax.block_until_ready(metrics)
    return steps * rows * seq_len / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Parses arguments, runs `bench`, prints one line of figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset_dir", help="prepared dataset directory (comma-separate several)")
    parser.add_argument("seq_len", type=int)
    parser.add_argument("batch", type=int, help="rows per batch")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--worker-processes", type=int, default=0)
    parser.add_argument("--shuffle-window-rows", type=int, default=1024)
    parser.add_argument("--prefetch", type=int, default=4, help="batches prefetched")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-config", help="also time this config's train step, e.g. configs/gpt2_124m.yaml")
    parser.add_argument("--train-batch", type=int, default=1, help="rows per timed train step")
    args = parser.parse_args(argv)
    dirs = args.dataset_dir.split(",")
    try:
        tokens = sum(load_dataset_metadata(d)["splits"]["train"]["tokens"] for d in dirs)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench_loader: error: {e}", file=sys.stderr)
        return 2
    r = bench(
        dirs,
        args.seq_len,
        args.batch,
        steps=args.steps,
        warmup=args.warmup,
        worker_processes=args.worker_processes,
        shuffle_window_rows=args.shuffle_window_rows,
        prefetch=args.prefetch,
        seed=args.seed,
    )
    print(
        f"loader {','.join(dirs)} ({tokens:,} train tokens) seq_len={args.seq_len} "
        f"batch={args.batch} workers={args.worker_processes}: "
        f"{r['tokens_per_sec']:,.0f} tokens/s ({r['slots_per_sec']:,.0f} slots/s), "
        f"packing efficiency {100 * r['packing_efficiency']:.2f}%, "
        f"first batch {r['first_batch_seconds']:.2f} s, {r['steps']} steps in "
        f"{r['seconds']:.2f} s"
    )
    if args.train_config:
        train_tps = training_tokens_per_sec(args.train_config, args.seq_len, args.train_batch)
        print(f"{'':<2}{'consumer':<44}{'tokens/s':>14}")
        loader_name = f"loader ({args.worker_processes} worker processes)"
        print(f"{'':<2}{loader_name:<44}{r['tokens_per_sec']:>14,.0f}")
        print(f"{'':<2}{'training ' + args.train_config + ' (this machine)':<44}{train_tps:>14,.1f}")
        print(f"  loader / training = {r['tokens_per_sec'] / train_tps:,.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
