"""Progress on rank zero. On a terminal: a rich bar with step count, loss, throughput and ETA.
Elsewhere (a SLURM or nohup log, where the bar would show nothing until the end): a plain line
every `plain_every_s` seconds and at each epoch's end. Each validation's scores, val/loss and
val/accuracy (val/perplexity for a sequence model), are shown next to the training loss as it
ends: in the plain lines from then on, and on a terminal as a line printed above the bar (the bar
itself stays one line that fits 80 columns)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from trainer.callbacks.base import Callback
from trainer.metrics import TRAIN_LOSS, TRAIN_SPEED, eval_metrics, perplexity_metric
from trainer.state import TrainState

VAL_LOSS, VAL_ACCURACY = eval_metrics("val")
VAL_PERPLEXITY = perplexity_metric("val")


class ProgressBar(Callback):
    def __init__(
        self,
        refresh_per_second: float = 2.0,
        plain_every_s: float = 30.0,
        console: Console | None = None,  # None: stderr
    ) -> None:
        self.refresh_per_second = refresh_per_second
        self.plain_every_s = plain_every_s
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self._plain = False  # plain lines rather than the bar
        self._show: Callable[[TrainState], None] | None = None  # _draw or _print, on rank zero
        self._period = 0.0
        self._next_update = 0.0  # time.monotonic() before which a step need not show progress
        self._fit_started = (0.0, 0)  # (time.monotonic(), step) as the fit started: plain ETA
        self._printed_step = -1
        self._rerouted: list[tuple[logging.StreamHandler, IO[str]]] = []

    def on_fit_start(self, state: TrainState) -> None:
        if not state.is_global_zero:
            return
        self._fit_started = (time.monotonic(), state.step)
        self._plain = not self.console.is_terminal
        if self._plain:
            self._show, self._period = self._print, self.plain_every_s
        else:
            self._start_bar(state)
            self._show, self._period = self._draw, 1.0 / self.refresh_per_second
        self._next_update = time.monotonic() + self._period

    def _start_bar(self, state: TrainState) -> None:
        # Few columns and no markup: each draw lays out a table of them (~1 ms for these four).
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}  {task.completed}/{task.total}", markup=False),
            BarColumn(),
            TextColumn(
                "loss {task.fields[loss]}  {task.fields[speed]} samples/s  eta", markup=False
            ),
            TimeRemainingColumn(),
            console=self.console,
            # Redrawn from the training thread, at most refresh_per_second times a second (see
            # on_step_end), rather than by rich's own thread: that thread's drawing would compete
            # with the training steps for the GIL at moments no one chooses.
            auto_refresh=False,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train",
            total=state.max_steps,
            completed=state.step,
            epoch=state.epoch,
            loss="-",
            speed="-",
        )
        stdout, stderr = sys.stdout, sys.stderr
        self.progress.start()  # draws the bar once; sys.stdout and sys.stderr now print above it
        self._route_logging({stdout: sys.stdout, stderr: sys.stderr})

    def _route_logging(self, proxies: dict[IO[str], IO[str]]) -> None:
        """Python logging's console handlers keep the stream they were given (Hydra's: sys.stdout
        as it was), past rich's redirection: their lines would be glued onto the bar. While the
        bar is live they write through rich's proxies instead, which print above it."""
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):  # placeholders have none
                if not isinstance(handler, logging.StreamHandler):
                    continue
                proxy = proxies.get(handler.stream, handler.stream)
                if proxy is not handler.stream:  # not redirected, or already rerouted
                    self._rerouted.append((handler, handler.setStream(proxy)))

    def on_step_end(self, state: TrainState) -> None:
        if self._show is None:
            return
        now = time.monotonic()
        # Drawing the bar costs ~1 ms of the training thread (more on a busy machine): at most
        # refresh_per_second times a second (plain lines: every plain_every_s), showing the
        # newest loss logged by then. on_fit_end shows the last step.
        if now < self._next_update:
            return
        self._next_update = now + self._period
        self._show(state)

    def on_epoch_end(self, state: TrainState) -> None:
        # Plain lines: one at every epoch's end. On a terminal: a line above the bar where the
        # epoch validated, which stays in the scrollback.
        if self._show is not None and (self._plain or state.current(VAL_LOSS) is not None):
            self._print(state)

    def _draw(self, state: TrainState) -> None:
        fields, metrics = {"epoch": state.epoch}, state.metrics
        if TRAIN_LOSS in metrics:
            fields["loss"] = f"{metrics[TRAIN_LOSS]:.4f}"
        if TRAIN_SPEED in metrics:
            fields["speed"] = f"{metrics[TRAIN_SPEED]:,.0f}"
        self.progress.update(self.task, completed=state.step, refresh=True, **fields)

    def _print(self, state: TrainState) -> None:
        metrics = state.metrics
        parts = [f"epoch {state.epoch}", f"step {state.step}/{state.max_steps}"]
        if TRAIN_LOSS in metrics:
            parts.append(f"loss {metrics[TRAIN_LOSS]:.4f}")
        parts += _val_scores(metrics)
        if TRAIN_SPEED in metrics:
            parts.append(f"{metrics[TRAIN_SPEED]:,.0f} samples/s")
        started, first_step = self._fit_started
        if state.step > first_step:
            per_step = (time.monotonic() - started) / (state.step - first_step)
            parts.append(
                f"eta {timedelta(seconds=round(per_step * (state.max_steps - state.step)))}"
            )
        self.console.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)
        if self._plain:
            self._printed_step = state.step

    def on_fit_end(self, state: TrainState) -> None:
        # Show where the run ended, even between two updates (once: an epoch's end may have).
        if self._show is not None and self._printed_step != state.step:
            self._show(state)
        self._close()

    def on_exception(self, state: TrainState, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        for handler, stream in reversed(self._rerouted):
            handler.setStream(stream)
        self._rerouted = []
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self._show = None


def _val_scores(metrics: dict[str, float]) -> list[str]:
    """The latest validation's loss and accuracy (perplexity for a sequence model), if any."""
    second = VAL_PERPLEXITY if VAL_PERPLEXITY in metrics else VAL_ACCURACY
    return [f"{name} {metrics[name]:.4f}" for name in (VAL_LOSS, second) if name in metrics]
