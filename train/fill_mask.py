"""`flaxpod fill-mask RUN_DIR --text "The [MASK] sat" [--text ...] [--top-k 5] [--step N]`: the most likely
tokens at each [MASK] of the texts, from a masked-LM run (train.objective=mlm)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxpod fill-mask", description=__doc__.split(":")[1].strip())
    parser.add_argument("run_dir", help="run directory of a masked-LM run")
    parser.add_argument("--text", action="append", default=[], help="text with one or more [MASK] (repeatable)")
    parser.add_argument("--top-k", type=int, default=5, help="fills shown per [MASK]")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)

    from flaxpod.train.cli import run_guarded

    def job() -> None:
        from flaxpod.train.mlm_eval import fill_mask, require_mlm
        from flaxpod.train.run_dir import load_run

        if not args.text:
            raise ValueError('no text: give --text "... [MASK] ..."')
        if args.top_k <= 0:
            raise ValueError(f"--top-k: expected a positive count, got {args.top_k}")
        run = load_run(args.run_dir, args.step)
        require_mlm(run, "fill-mask")
        for text, fills in zip(args.text, fill_mask(run, args.text, args.top_k), strict=True):
            print(f"=== {text} (step {run.step}) ===")
            for n, options in enumerate(fills, 1):
                shown = "  ".join(f"{piece!r} {p:.3f}" for piece, p in options)
                print(f"[MASK] {n}: {shown}")

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
