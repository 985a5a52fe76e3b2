"""Fault callbacks for the resume and interruption tests, as real as those of tests/faults.py.

+callbacks.kill._target_=tests.resume_faults.KillWhileSaving +callbacks.kill.step=12
"""

from __future__ import annotations

import os
import signal

from trainer.callbacks.base import Callback
from trainer.state import TrainState


class KillWhileSaving(Callback):
    """SIGKILL this process while it saves the checkpoint of step `step` (the checkpoint asks
    for every callback's `state_dict`, after the logs were flushed and before the commit), in
    the first attempt only (TORCHELASTIC_RESTART_COUNT == "0", as `tests.faults.KillOnce`)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.at_step = 0

    def on_step_end(self, state: TrainState) -> None:
        self.at_step = state.step

    def state_dict(self) -> dict[str, int]:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        if self.at_step == self.step and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}


class SignalTwice(Callback):
    """Send the real signal SIGINT to this process twice while step `step` runs (a user pressing
    Ctrl-C twice), from `on_step_start`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_start(self, state: TrainState) -> None:
        if state.step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def interrupted_while_building(**synthetic_args):
    """A dataset builder that sends this process SIGINT (Ctrl-C) while the trainer is being
    built, outside fit, then builds `trainer.data.datasets.synthetic(**synthetic_args)`."""
    from trainer.data.datasets import synthetic

    os.kill(os.getpid(), signal.SIGINT)
    return synthetic(**synthetic_args)
