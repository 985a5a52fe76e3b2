"""The training metrics of one log window: the loss and gradient norm of every step since the
last log step, kept on the device as they come and summed on the log step, then all-reduced with
the ranks' stop flags in one asynchronous collective while the next window trains."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch

from trainer.distributed.env import DistEnv, several_ranks, start_all_reduce_sum
from trainer.metrics import TRAIN_GRAD_NORM, TRAIN_LOSS, TRAIN_SPEED


class Reduction(NamedTuple):
    """A log step's window on its way to every rank (`LogWindow.start_reduce`)."""

    step: int
    # [loss sum, grad norm sum], and under torchrun a 0/1 per flag, all summed in place.
    values: torch.Tensor
    work: Any  # the all-reduce's handle; None in one process, where nothing is reduced
    flags: list[bool]  # this rank's own
    count: int  # steps in the window
    speed: float  # this rank's samples per second over the window


class LogWindow:
    """Training loss, gradient norm and throughput since the last log step. On a log step the
    sums go to every rank with the stop flags in one asynchronous all-reduce (`start_reduce`),
    read back by `finish_reduce`; the next window starts meanwhile. In one process nothing is
    reduced.

    train/grad_norm is the mean over the window, like train/loss beside it: every step counts
    (the last step's alone would be one batch's norm in `log_every_steps`), at no cost per step."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []  # summed on log steps: no tensor op per step
        self.norms: list[torch.Tensor] = []
        self.samples = 0
        self.started = time.perf_counter()
        self._reducing: Reduction | None = None

    @property
    def in_flight(self) -> bool:
        return self._reducing is not None

    @property
    def reducing_step(self) -> int:
        return self._reducing.step

    def add(self, loss: torch.Tensor, norm: torch.Tensor, samples: int) -> None:
        self.losses.append(loss)
        self.norms.append(norm)
        self.samples += samples

    def start_reduce(self, step: int, flags: list[bool]) -> None:
        sums = torch.stack(
            [torch.stack(t).sum(dtype=torch.float64) for t in (self.losses, self.norms)]
        )
        values, work = sums, None  # one process: nothing to reduce
        if several_ranks():
            # The sums, then each flag as 0/1, in one tensor for one all-reduce. The flags are
            # written on the device: no copy from host memory to wait for.
            values = sums.new_zeros(len(sums) + len(flags))
            values[: len(sums)] = sums
            for i, flag in enumerate(flags, start=len(sums)):
                values[i] = float(flag)
            work = start_all_reduce_sum(values)
        now = time.perf_counter()
        speed = self.samples / max(now - self.started, 1e-9)
        self._reducing = Reduction(step, values, work, flags, len(self.losses), speed)
        self.losses, self.norms, self.samples, self.started = [], [], 0, now

    def finish_reduce(self, env: DistEnv) -> tuple[dict[str, float], list[bool]]:
        """The reduced window's metrics, and the stop flags, each true if any rank's was."""
        reduction, self._reducing = self._reducing, None
        if reduction.work is not None:
            reduction.work.wait()
        loss_sum, norm_sum, *counts = reduction.values.tolist()
        flags = reduction.flags if reduction.work is None else [count > 0 for count in counts]
        # Summed over all ranks. Under tensor parallelism the ranks of one group share a batch
        # and compute the same loss, so each batch counts tp times: world = dp x tp. The norm is
        # the same on every rank (DDP's averaged gradients, FSDP2's and TP's reduced norms).
        steps = reduction.count * env.world_size
        metrics = {
            TRAIN_LOSS: loss_sum / steps,
            TRAIN_GRAD_NORM: norm_sum / steps,
            TRAIN_SPEED: reduction.speed,
        }
        return metrics, flags
