"""Reading JSONL files whose rows users wrote: every problem is one InputError naming file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flaxpod.model.errors import InputError


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a missing or empty file, a line that is not UTF-8,
    not JSON or not an object is an InputError naming the file (and line, and byte)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    seen = False
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                # utf-8-sig on the first line: drops the byte-order mark some Windows editors write
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{p}:{lineno}: not UTF-8 ({e.reason} at byte {e.start + 1} of the line)") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{p}:{lineno}: expected a JSON object, got {json_type(record)}")
            seen = True
            yield lineno, record
    if not seen:
        raise InputError(f"{p}: empty file: no JSON lines")


def json_type(value: Any) -> str:
    """A decoded JSON value's type in JSON's words ("an array", "null"), for error messages."""
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)
