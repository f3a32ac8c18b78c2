"""First-step compile time of the real train step against depth, with and without the layer scan.

    python -m tools.bench_compile [--layers 4,24] [key.sub=value ...]

For each depth and each `model.scan_layers` setting, builds the Trainer (one device) for
configs/shakespeare_char.yaml with the overrides, then times `jit(step).lower(...).compile()`
(tracing + XLA compilation, no execution). With the scan, the step holds one layer's code whatever
the depth, so compile time stays nearly flat; unrolled, it grows with the layer count.
"""

from __future__ import annotations

import argparse
import sys
import time

from tools.bench_vs_torch import CHAR_VOCAB, DEFAULT_CONFIG, bench_config, one_device_trainer, random_batches


def compile_seconds(overrides: list[str]) -> float:
    cfg = bench_config(DEFAULT_CONFIG, overrides, CHAR_VOCAB)
    trainer = one_device_trainer(cfg)
    state = trainer.init_state(cfg.seed)
    batch = trainer.put(random_batches(cfg, CHAR_VOCAB, 1)[0])
    t0 = time.perf_counter()
    trainer.step.lower(state, batch).compile()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_compile", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--layers", default="4,24", help="comma-separated depths")
    args = parser.parse_args(argv)
    depths = [int(n) for n in args.layers.split(",")]
    print(f"{'layers':>6}{'scan s':>9}{'unrolled s':>12}   overrides: {' '.join(args.overrides) or '(none)'}")
    for n in depths:
        depth = [*args.overrides, f"model.n_layer={n}"]
        row = [compile_seconds([*depth, f"model.scan_layers={scan}"]) for scan in (True, False)]
        print(f"{n:>6}{row[0]:>9.1f}{row[1]:>12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
