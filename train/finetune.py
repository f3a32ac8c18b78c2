"""`flaxpod finetune CONFIG.yaml [key.sub=value ...]` (also `python -m flaxpod.train.finetune`).

Adapts a pretrained run (`finetune.base=RUN_DIR`) to a task: `sft` (instruction or chat tuning, loss on
responses only) or `classify` (a classification head). Re-running on the same run_dir resumes it.
"""

from __future__ import annotations

import argparse
import sys

from flaxpod.sharding.distributed import initialize_from_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxpod finetune", description=__doc__.split("\n\n")[1])
    parser.add_argument("config", help="YAML config, e.g. configs/finetune_sft.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. finetune.base=runs/tiny")
    args = parser.parse_args(argv)
    initialize_from_env()  # before anything touches a device

    from flaxpod.train.cli import run_guarded
    from flaxpod.train.config import explicit_keys, load_config
    from flaxpod.train.finetuning import run_finetuning

    def job() -> None:
        cfg = load_config(args.config, args.overrides)
        run_finetuning(cfg, explicit_keys(args.config, args.overrides))

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
