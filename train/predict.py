"""`flaxpod predict RUN_DIR --text TEXT [--text ...] [--file FILE] [--out PREDICTIONS.jsonl]`.

Labels of texts from a classification run (`flaxpod finetune` with finetune.task=classify), one JSON
object a line: {"text", "label", "probability"}. --file reads a CSV/TSV/JSONL file's text column
(data.text_field of the run). The run's best step is used unless --step is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxpod predict", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", help="a classification run directory")
    parser.add_argument("--text", action="append", default=[], help="text to classify (repeatable)")
    parser.add_argument("--file", default=None, help="CSV/TSV/JSONL file whose text column is classified")
    parser.add_argument("--out", default=None, help="write the JSONL here instead of standard output")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the best, else the latest)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch")
    args = parser.parse_args(argv)

    from flaxpod.sharding.distributed import initialize_from_env

    initialize_from_env()
    from flaxpod.data.classify import read_examples
    from flaxpod.model.errors import InputError
    from flaxpod.train.cli import run_guarded
    from flaxpod.train.run_dir import load_run
    from flaxpod.train.task_eval import predict_texts, write_jsonl

    def job() -> None:
        if args.batch_size <= 0:
            raise InputError(f"--batch-size: expected a positive count, got {args.batch_size}")
        run = load_run(args.run_dir, args.step)
        texts = list(args.text)
        if args.file is not None:
            texts += [ex.text for ex in read_examples(args.file, run.cfg.data.text_field, label_field=None)]
        rows = predict_texts(run, texts, batch_size=args.batch_size)
        if args.out is not None:
            write_jsonl(Path(args.out), rows)
            print(f"{len(rows)} predictions of step {run.step} written to {args.out}", file=sys.stderr)
        else:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False))

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
