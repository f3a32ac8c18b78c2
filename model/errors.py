"""The one error convention of flaxpod: a user-fixable problem is a `FlaxpodError` whose message is
one line naming the culprit (file, line, key, expected vs. got) and whose `exit_code` the CLI returns.

This module imports nothing, so every package may use it: it is the single exception to the rule
that `data` and `model` import nothing of the others (it lives in `model`, the lowest layer).
"""

from __future__ import annotations


class FlaxpodError(Exception):
    """A problem the user can fix; `flaxpod` prints the message as one line and exits `exit_code`."""

    exit_code = 2

    def one_line(self) -> str:
        """What the CLI prints: `error: MESSAGE`."""
        return f"error: {self}"


class InputError(FlaxpodError, ValueError):
    """Bad input: a config value, a data file, a path, a command-line option (exit 2)."""


class ConfigError(InputError):
    """A config problem; the message names the key (and the closest valid one for a typo)."""
