"""The logger interface and the group that fans metrics out to every configured logger."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any


class Logger:
    """Receives the resolved config once, metrics on log steps, and `finish()` at the end."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def finish(self) -> None: ...


class LoggerGroup(Logger):
    """Calls every logger; one that raises is warned about once and dropped, and training goes on."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = list(loggers)

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as err:  # a logging outage must never end a training run
                warnings.warn(
                    f"logger {type(logger).__name__} failed in {method} ({err!r}); "
                    "it is switched off for the rest of the run",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.loggers.remove(logger)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._each("log_config", config)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def finish(self) -> None:
        self._each("finish")
