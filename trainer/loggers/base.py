"""The logger interface and the group that fans metrics out to every configured logger."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Logger:
    """Receives the resolved config once, metrics on log steps, and `finish()` at the end;
    `flush()` returns once everything sent so far is written."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def finish(self) -> None: ...


class LoggerGroup(Logger):
    """Calls every logger, in order, from one background thread; one that raises is warned about
    once and dropped, and training goes on.

    Writing is slow next to a small training step (wandb's `run.log` alone takes about 1 ms), and
    the step does not need to wait for it: torch releases the GIL inside its kernels, so the
    writes overlap the next steps. `flush()` waits for what was sent; `finish()` flushes first.
    """

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = list(loggers)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hooktrain-loggers")

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
        self._writer.submit(self._each, "log_config", dict(config))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # A copy: the caller clears and refills its dict while this one waits in the queue.
        self._writer.submit(self._each, "log_metrics", dict(metrics), step)

    def flush(self) -> None:
        self._writer.submit(lambda: None).result()

    def finish(self) -> None:
        self._writer.submit(self._each, "finish").result()
        self._writer.shutdown()
