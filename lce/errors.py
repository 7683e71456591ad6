"""Errors lce raises for bad input. Each message names the bad value and what is allowed."""

import difflib
from collections.abc import Iterable


class LceError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback by the CLI."""


class ConfigError(LceError, ValueError):
    """An unknown key, a value of the wrong type, or an impossible parameter."""


class UnsupportedModelError(LceError):
    """A model family or model feature lce has no adapter for."""


def did_you_mean(value: str, allowed: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix naming the closest allowed value, or ''."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
