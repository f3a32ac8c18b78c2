"""Loader throughput on prepared shards: tokens/s and packing efficiency.

    PYTHONPATH=. python tools/bench_loader.py DATASET_DIR SEQ_LEN BATCH [--steps N]
        [--warmup 10] [--worker-processes 0] [--shuffle-window-rows 1024] [--prefetch 4]

Builds the training iterator of `data.prepared` exactly as training does (one process),
takes `--warmup` batches, then times `--steps` batches (by default enough for 4 row
shuffle windows and at least 200, since the window fills in bursts). Prints slots/s (batch * seq_len
per second), real tokens/s (positions with loss_mask 1, i.e. slots/s times the packing
efficiency), the packing efficiency, and the time to the first batch. Several
comma-separated dataset directories are mixed with equal weights.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from data.prepared import load_dataset_metadata, make_packed_train_iterator


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
        dataset_dirs, seq_len=seq_len, global_batch_size=batch, seed=seed,
        worker_processes=worker_processes, shuffle_window_rows=shuffle_window_rows,
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
    args = parser.parse_args(argv)
    dirs = args.dataset_dir.split(",")
    try:
        tokens = sum(load_dataset_metadata(d)["splits"]["train"]["tokens"] for d in dirs)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench_loader: error: {e}", file=sys.stderr)
        return 2
    r = bench(dirs, args.seq_len, args.batch, steps=args.steps, warmup=args.warmup,
              worker_processes=args.worker_processes,
              shuffle_window_rows=args.shuffle_window_rows, prefetch=args.prefetch,
              seed=args.seed)
    print(
        f"loader {','.join(dirs)} ({tokens:,} train tokens) seq_len={args.seq_len} "
        f"batch={args.batch} workers={args.worker_processes}: "
        f"{r['tokens_per_sec']:,.0f} tokens/s ({r['slots_per_sec']:,.0f} slots/s), "
        f"packing efficiency {100 * r['packing_efficiency']:.2f}%, "
        f"first batch {r['first_batch_seconds']:.2f} s, {r['steps']} steps in "
        f"{r['seconds']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
