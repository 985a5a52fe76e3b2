"""Learning-rate schedules: the rate is a pure function of the optimizer step.

Before step t each parameter group's rate is set to `initial_lr * factor(t, total_steps)`, the same
convention as `torch.optim.lr_scheduler.LambdaLR` after t calls to `.step()`. A pure function needs
no saved state: a resumed run recomputes the rate from the step it resumes at.
"""

from __future__ import annotations

import math

from trainer.callbacks.base import Callback
from trainer.state import TrainState


class LRSchedule(Callback):
    """Base class: subclasses define `factor(step, total)`."""

    def factor(self, step: int, total: int) -> float:
        raise NotImplementedError

    def on_fit_start(self, state: TrainState) -> None:
        for group in state.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.on_step_start(state)

    def on_step_start(self, state: TrainState) -> None:
        scale = self.factor(state.step, state.max_steps)
        for group in state.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * scale


class Constant(LRSchedule):
    def factor(self, step: int, total: int) -> float:
        return 1.0


class WarmupCosine(LRSchedule):
    """Linear warm-up from ~0 over `warmup_steps`, then cosine decay to `min_ratio` at the end."""

    def __init__(self, warmup_steps: int = 0, min_ratio: float = 0.0) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio

    def factor(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(total - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
