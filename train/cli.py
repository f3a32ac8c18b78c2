"""The `flaxpod` command: one entry point, one subcommand per job."""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable

from flaxpod.model.errors import FlaxpodError

SUBCOMMANDS = {
    "pretrain": ("flaxpod.train.pretrain", "main", "pretrain a model from a YAML config"),
    "finetune": ("flaxpod.train.finetune", "main", "finetune a pretrained run on a task (sft, classify)"),
    "prepare": ("flaxpod.data.prepare", "main", "tokenize text into ArrayRecord shards for training"),
    "tokenizer": ("flaxpod.data.prepare", "tokenizer_main", "train a SentencePiece tokenizer on text"),
    "evaluate": (
        "flaxpod.train.evaluate",
        "main",
        "loss, perplexity, bits per byte and multiple-choice accuracy of a checkpoint",
    ),
    "generate": ("flaxpod.train.generate", "main", "sample text from a checkpoint (KV-cache decoding)"),
    "fill-mask": ("flaxpod.train.fill_mask", "main", "top-k fills of [MASK] tokens from a masked-LM run"),
    "predict": ("flaxpod.train.predict", "main", "labels and probabilities of texts from a classification run"),
    "export": ("flaxpod.train.export", "main", "write a checkpoint as a Hugging Face model directory or safetensors"),
    "import-hf": ("flaxpod.train.import_hf", "main", "turn a Hugging Face GPT-2/Llama directory into a run directory"),
    "launch": ("flaxpod.sharding.launch", "main", "run a command as N JAX processes on this machine"),
    "config-reference": (
        "flaxpod.train.cli",
        "config_reference",
        "print every config key with its meaning",
    ),
}


DEBUG_ENV = "FLAXPOD_DEBUG"  # =1: let errors end in their traceback (for bug reports)
# Errors of the standard library that only bad input raises here (a missing or unreadable path,
# a value a parser refused): reported like a FlaxpodError, as one line and exit 2.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_guarded(job: Callable[[], object]) -> int:
    """Runs a job under the one error convention: a FlaxpodError (bad config, data or path; a run
    stopped on purpose; a failed checkpoint write) prints one line and returns its `exit_code`.
    With FLAXPOD_DEBUG=1 the error is raised with its traceback instead."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        job()
        return 0
    try:
        job()
    except FlaxpodError as e:
        print(e.one_line(), file=sys.stderr)
        return e.exit_code
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def config_reference(argv: list[str]) -> int:
    from flaxpod.train.config import config_reference_markdown

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
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown subcommand '{name}'{hint}\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    return getattr(importlib.import_module(module), func)(rest)


if __name__ == "__main__":
    sys.exit(main())
