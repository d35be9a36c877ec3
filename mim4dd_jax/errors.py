"""User-facing errors.

A :class:`ConfigError` is a user mistake (a config value, a path, a name). The command-line shell
prints its message as one line and exits with status 2; library callers can catch it like any
``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A user mistake: the message names the bad value and the valid choices."""


def check_choice(what: str, value: object, choices: Iterable[object]) -> None:
    """Raises ConfigError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {valid}")
