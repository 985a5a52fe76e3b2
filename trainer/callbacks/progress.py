"""A rich progress bar on rank zero: step count, loss, throughput and ETA."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from trainer.callbacks.base import Callback
from trainer.state import TrainState


class ProgressBar(Callback):
    def __init__(self, refresh_per_second: float = 2.0) -> None:
        self.refresh_per_second = refresh_per_second
        self.progress: Progress | None = None
        self._next_update = 0.0  # time.monotonic() before which a step need not update the bar

    def on_fit_start(self, state: TrainState) -> None:
        if not state.is_global_zero:
            return
        # Few columns and no markup: each draw lays out a table of them (~1 ms for these four).
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}  {task.completed}/{task.total}", markup=False),
            BarColumn(),
            TextColumn(
                "loss {task.fields[loss]}  {task.fields[speed]} samples/s  eta", markup=False
            ),
            TimeRemainingColumn(),
            console=Console(stderr=True),
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
        self.progress.start()  # draws the bar once; the next draw is due a period later
        self._next_update = time.monotonic() + 1.0 / self.refresh_per_second

    def on_step_end(self, state: TrainState) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        # Drawing the bar costs ~1 ms of the training thread (more on a busy machine): at most
        # refresh_per_second times a second, showing the newest loss logged by then. on_fit_end
        # draws the last step.
        if now < self._next_update:
            return
        self._next_update = now + 1.0 / self.refresh_per_second
        self._draw(state)

    def _draw(self, state: TrainState) -> None:
        fields, metrics = {"epoch": state.epoch}, state.metrics
        if "train/loss" in metrics:
            fields["loss"] = f"{metrics['train/loss']:.4f}"
        if "train/samples_per_second" in metrics:
            fields["speed"] = f"{metrics['train/samples_per_second']:,.0f}"
        self.progress.update(self.task, completed=state.step, refresh=True, **fields)

    def on_fit_end(self, state: TrainState) -> None:
        if self.progress is not None:  # show where the run ended, even between two updates
            self._draw(state)
        self._close()

    def on_exception(self, state: TrainState, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
