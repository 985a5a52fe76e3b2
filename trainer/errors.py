"""`ConfigError`: a configuration value that cannot be used. The command line prints its message
as one line and exits with code 2; every message begins with the key it is about."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")
