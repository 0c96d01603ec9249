"""User-facing errors.

Every problem caused by the user's input (a malformed raw row, a wrong path, a bad config value, a
checkpoint that does not fit the data) is raised as :class:`IHASError` with a one-line message that
names the file / line / config key and the rule broken. The CLI prints it as ``error: <message>``
and exits with status 2, without a traceback.
"""

from __future__ import annotations


class IHASError(Exception):
    """An error the user can fix; the message is a single line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(IHASError):
    """A config value is missing or out of range (the message names the key)."""


class DataError(IHASError):
    """Raw or prepared data breaks a rule (the message names the file and line or row)."""


def require(cond: bool, key: str, rule: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"config key '{key}': {rule}")
