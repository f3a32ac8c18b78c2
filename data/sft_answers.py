"""Answers out of generated text, for exact-match evaluation of SFT models.

An extractor is one of:

    full            the whole text, stripped of surrounding whitespace
    after:MARKER    the text after the first MARKER, stripped (GSM8K: `after:####`)
    regex:PATTERN   the first match of PATTERN (Python `re.search`): its first group if it has
                    groups, else the whole match, stripped

Text without an answer (no marker, no match) extracts to None, which matches nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from flaxpod.data.sft_format import SFTEvalPair
from flaxpod.model.errors import ConfigError, InputError


@functools.lru_cache(maxsize=64)
def _compiled(extractor: str) -> tuple[str, str | re.Pattern]:
    """(kind, argument) of a checked extractor spec."""
    kind, sep, arg = extractor.partition(":")
    if kind == "full" and not sep:
        return "full", ""
    if kind == "after" and sep and arg:
        return "after", arg
    if kind == "regex" and sep and arg:
        try:
            return "regex", re.compile(arg)
        except re.error as e:
            raise ConfigError(f"answer extractor {extractor!r}: invalid regex ({e})") from None
    raise ConfigError(f"answer extractor {extractor!r}: expected 'full', 'after:MARKER' or 'regex:PATTERN'")


def check_extractor(extractor: str) -> None:
    """Raises ConfigError naming the spec when it is not a valid extractor."""
    _compiled(extractor)


def extract_answer(text: str, extractor: str) -> str | None:
    """The answer in `text` by `extractor` (see the module docstring), or None when there is none."""
    kind, arg = _compiled(extractor)
    if kind == "full":
        return text.strip()
    if kind == "after":
        _, found, rest = text.partition(arg)
        return rest.strip() if found else None
    match = arg.search(text)
    if match is None:
        return None
    return (match.group(1) if arg.groups else match.group(0)).strip()


def exact_match(prediction: str, reference: str, extractor: str) -> bool:
    """True when the prediction's answer equals the reference's; a reference without one is an error."""
    wanted = extract_answer(reference, extractor)
    if wanted is None:
        raise InputError(f"reference {reference[:60]!r}: no answer found by extractor {extractor!r}")
    return extract_answer(prediction, extractor) == wanted


def check_references(pairs: Sequence[SFTEvalPair], extractor: str) -> None:
    """Raises InputError naming file and line of the first reference without an answer (before generating)."""
    for pair in pairs:
        if extract_answer(pair.reference, extractor) is None:
            raise InputError(f"{pair.where}: the reference has no answer for extractor {extractor!r}")
