"""The `flaxpod` command: one entry point, one subcommand per job."""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable

from flaxpod.model.errors import FlaxpodError, InputError

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
    "plan": ("flaxpod.train.plan", "main", "compile a config for a TPU slice or GPU hosts and check that it fits"),
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


class _DropTracebacks(logging.Filter):
    """Drops library log records that carry a traceback of an error flaxpod re-raises and reports
    itself (Orbax's background threads log a failed checkpoint write with its traceback before the
    write error reaches the caller; asyncio then reports the same futures as never retrieved)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return False
        return not str(record.msg).endswith("exception was never retrieved")


def _quiet_unraisable(previous: Callable) -> Callable:
    def hook(unraisable: object) -> None:
        # Late tensorstore callbacks into the event loop Orbax closed after a failed write: harmless.
        exc = getattr(unraisable, "exc_value", None)
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    return hook


_hidden = False


def _hide_library_tracebacks() -> None:
    """For the rest of the process (a flaxpod command ends with its job; Orbax's threads and
    asyncio's garbage collection report the same failure after the job has returned)."""
    global _hidden
    if _hidden:
        return
    _hidden = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_DropTracebacks())
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    # Orbax's write coroutines left pending by a failed write are collected at interpreter exit, and
    # Python warns about each one then ("sys:1: RuntimeWarning: coroutine ... was never awaited"),
    # after the one-line error; whether any is left pending depends on which write failed first.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


def run_guarded(job: Callable[[], object]) -> int:
    """Runs a job under the one error convention: a FlaxpodError (bad config, data or path; a run
    stopped on purpose; a failed checkpoint write) prints one line and returns its `exit_code`, and
    libraries' tracebacks of the same failure are not printed before it. With FLAXPOD_DEBUG=1 the
    error is raised with its traceback instead, and nothing is hidden."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        job()
        return 0
    _hide_library_tracebacks()
    try:
        job()
    except FlaxpodError as e:
        print(e.one_line(), file=sys.stderr)
        return e.exit_code
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_option(
    option: str,
    value: float | None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> None:
    """A numeric command-line option (None: not given): finite and within range, else one
    InputError line naming it. argparse's `type=` cannot do this: it prints usage over two lines,
    and a negative batch size or a NaN temperature would otherwise run and report nonsense."""
    if value is None:
        return
    bounds = []
    if above is not None:
        bounds.append(f"> {above}")
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    ok = (
        math.isfinite(value)
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
        and (above is None or value > above)
    )
    if not ok:
        raise InputError(f"{option}: expected a number {' and '.join(bounds) or 'that is finite'}, got {value}")


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
