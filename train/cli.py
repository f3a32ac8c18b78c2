"""The `flaxpod` command: one entry point, one subcommand per job."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

SUBCOMMANDS = {
    "pretrain": ("train.pretrain", "main", "pretrain a model from a YAML config"),
    "prepare": ("data.prepare", "main", "tokenize text into ArrayRecord shards for training"),
    "tokenizer": ("data.prepare", "tokenizer_main", "train a SentencePiece tokenizer on text"),
    "evaluate": (
        "train.evaluate",
        "main",
        "loss, perplexity, bits per byte and multiple-choice accuracy of a checkpoint",
    ),
    "generate": ("train.generate", "main", "sample text from a checkpoint (KV-cache decoding)"),
    "export": ("tools.hf_export", "main", "write a checkpoint as a Hugging Face model directory or safetensors"),
    "import-hf": ("tools.hf_import", "main", "turn a Hugging Face GPT-2/Llama directory into a run directory"),
    "launch": ("sharding.launch", "main", "run a command as N JAX processes on this machine"),
    "config-reference": (
        "train.cli",
        "config_reference",
        "print every config key with its meaning",
    ),
}


def run_guarded(job: Callable[[], object]) -> int:
    """Runs a job; a user error (bad config, data or path) becomes one line and exit code 2. A run
    that ends early on purpose (train/faults.py: stop request, non-finite step, failed checkpoint
    write) prints its message and exits with its own code."""
    from train.checkpoint import CheckpointWriteError
    from train.config import ConfigError
    from train.faults import RunInterrupted

    try:
        job()
    except RunInterrupted as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def config_reference(argv: list[str]) -> int:
    from train.config import config_reference_markdown

    print(config_reference_markdown())
    return 0


def usage() -> str:
    lines = ["usage: flaxpod SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        import difflib

        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown subcommand '{name}'{hint}\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    return getattr(importlib.import_module(module), func)(rest)


if __name__ == "__main__":
    sys.exit(main())
