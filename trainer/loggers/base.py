"""The logger interface and the group that fans metrics out to every configured logger."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Logger:
    """Receives the resolved config once, metrics on log steps, and `finish()` at the end;
    `flush()` returns once everything sent so far is written (the loop flushes before each
    checkpoint, so that a crash loses no row that the checkpoint covers). `rewind(step)` comes
    when a resumed fit goes on from `step`: rows an earlier attempt wrote after it are dropped,
    since the resumed fit logs those steps again."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def rewind(self, step: int) -> None: ...
    def flush(self) -> None: ...
    def finish(self) -> None: ...


class LoggerGroup(Logger):
    """Starts and calls every logger, in order, from one background thread; one that cannot start
    or later raises is warned about once and left out, and training goes on.

    Starting is slow (`wandb.init` spawns its service: about 2 s) and so is writing next to a small
    training step (wandb's `run.log`, TensorBoard's event: 0.1-0.2 ms each); training needs to
    wait for neither. torch releases the GIL inside its kernels, so this work overlaps the steps.
    Metrics are handed over at most once every `send_every_s` seconds, in one batch: each
    hand-off wakes the thread, which then takes the GIL from the training thread. `flush()` sends
    what is held and waits until every logger has flushed it; `finish()` sends it first.

    `starters` maps a name (its config key, for messages) to a function that builds the logger.
    """

    def __init__(
        self, starters: Mapping[str, Callable[[], Logger]], send_every_s: float = 1.0
    ) -> None:
        self.loggers: list[Logger] = []
        self.send_every_s = send_every_s
        self._held: list[tuple[dict[str, float], int]] = []  # (metrics, step) not yet sent
        self._sent_at = time.monotonic()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hooktrain-loggers")
        self._writer.submit(self._start, dict(starters))

    def _start(self, starters: dict[str, Callable[[], Logger]]) -> None:
        for name, start in starters.items():
            try:
                self.loggers.append(start())
            except Exception as err:  # a backend that cannot start must not stop training
                warnings.warn(
                    f"{name} could not start ({err!r}); the run goes on without it",
                    RuntimeWarning,
                    stacklevel=2,
                )

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

    def _write(self, rows: list[tuple[dict[str, float], int]]) -> None:
        for metrics, step in rows:
            self._each("log_metrics", metrics, step)

    def _send(self) -> None:
        if self._held:
            self._writer.submit(self._write, self._held)
            self._held = []
        self._sent_at = time.monotonic()

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._send()  # keep the order of calls
        self._writer.submit(self._each, "log_config", dict(config))

    def rewind(self, step: int) -> None:
        self._send()
        self._writer.submit(self._each, "rewind", step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # A copy: the caller clears and refills its dict while this one waits.
        self._held.append((dict(metrics), step))
        if time.monotonic() - self._sent_at >= self.send_every_s:
            self._send()

    def flush(self) -> None:
        self._send()
        self._writer.submit(self._each, "flush").result()

    def finish(self) -> None:
        self._send()
        self._writer.submit(self._each, "finish").result()
        self._writer.shutdown()
