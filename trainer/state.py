"""`TrainState`: what the loop knows, handed to every callback hook.

Counters and the latest metrics are saved in checkpoints (`state_dict`); the live objects (model,
optimizer, loaders) are references that the checkpoint code saves through their own APIs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from trainer.compress.report import CompressionReport


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    max_steps: int  # optimizer steps this fit will run (resolved from max_steps / max_epochs)
    steps_per_epoch: int
    rank: int = 0
    world_size: int = 1
    # measure("val" | "test", model=None) -> {"val/loss": ..., "val/accuracy": ...}: a quiet
    # evaluation that callbacks may run (on every rank at once); it neither logs nor fires
    # on_eval_end. `model`: another model to evaluate instead (a compressed copy).
    measure: Callable[..., dict[str, float]] | None = field(default=None, repr=False)
    # The whole training split, the same on every rank (the loader reads a rank's shard of it):
    # where callbacks take fixed samples from, e.g. quantization's calibration batches.
    train_data: Dataset | None = field(default=None, repr=False)

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # the epoch in progress (0-based)
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    samples_seen: int = 0  # global training samples consumed
    # Latest values by name ("train/loss", "val/accuracy", "lr", ...). Write through `log()`:
    # only what `log()` records reaches the loggers (in the next log step's row).
    metrics: dict[str, float] = field(default_factory=dict)
    should_stop: bool = False  # set through request_stop(); agreed across ranks by the loop
    stop_reason: str = ""
    # The fit stopped to be resumed (a stop signal, nonfinite=stop), agreed across ranks: work at
    # on_fit_end that the resumed run will do at its own end (quantizing, reports) is skipped.
    interrupted: bool = False
    unlogged: dict[str, float] = field(
        default_factory=dict
    )  # sent to the loggers at the next flush
    logged_at: dict[str, int] = field(default_factory=dict)  # name -> the step it was logged at
    # One row per compression stage (trainer/compress/report.py), created by the first stage.
    compression: CompressionReport | None = None
    # Set by a stage that changes what is deployed (structured pruning: the shrunk model): turns
    # a plain full-weight copy of the trained model into the model later stages compress.
    deploy: Callable[[nn.Module], nn.Module] | None = None

    def log(self, metrics: dict[str, float]) -> None:
        """Record metrics: they show in `metrics` at once and reach the loggers in the next log
        step's row (under torchrun sent one step later, with that log step's number)."""
        self.metrics.update(metrics)
        self.unlogged.update(metrics)
        self.logged_at.update(dict.fromkeys(metrics, self.step))

    def current(self, name: str) -> float | None:
        """`name`'s value if it was logged at this very step, so that it describes the weights
        as they are now (a checkpoint's score); None otherwise, e.g. mid-epoch for the last
        validation's score."""
        return self.metrics[name] if self.logged_at.get(name) == self.step else None

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop: in one process after the current step; under torchrun every rank
        stops after the same, possibly later, step (see `Callback`)."""
        self.should_stop = True
        self.stop_reason = self.stop_reason or reason

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "samples_seen": self.samples_seen,
            "metrics": dict(self.metrics),
        }
        if self.compression is not None:  # a stage measured mid-run (before fine-tuning)
            state["compression"] = self.compression.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.samples_seen = int(state["samples_seen"])
        self.metrics = dict(state["metrics"])
        if "compression" in state:
            # Here, not at the top: a run that compresses nothing never loads the report's modules.
            from trainer.compress.report import CompressionReport

            self.compression = CompressionReport(state["compression"]["rows"])


def rate_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rates in use, as logged: "lr" (group 0), and with several groups
    "lr/group{i}" for each."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    metrics = {"lr": lrs[0]}
    if len(lrs) > 1:
        metrics.update({f"lr/group{i}": lr for i, lr in enumerate(lrs)})
    return metrics
