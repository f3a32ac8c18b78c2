"""`flaxpod pretrain CONFIG.yaml [key.sub=value ...]` (also `python -m train.pretrain`)."""

from __future__ import annotations

import argparse
import sys

from flaxpod.sharding.distributed import initialize_from_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flaxpod pretrain",
        description="Pretrain a language model. Re-running on the same run_dir resumes it.",
    )
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    initialize_from_env()  # before anything touches a device

    from flaxpod.train.cli import run_guarded
    from flaxpod.train.config import load_config
    from flaxpod.train.loop import run_pretraining

    return run_guarded(lambda: run_pretraining(load_config(args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
