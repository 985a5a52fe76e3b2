"""Learning-rate schedules: callbacks that set every parameter group's rate before it is used.

A schedule is a pure function of a clock `t` that counts optimizer steps (`interval="step"`:
`t = state.step` out of `total = state.max_steps`, applied in `on_step_start`) or epochs
(`interval="epoch"`: `t = state.epoch` out of the run's epochs, applied in `on_epoch_start`). With
`interval="epoch"`, counts such as `warmup_steps`, `step_size` and `milestones` are in epochs.

Before step (or epoch) t each group's rate is `rate(initial_lr, t, total)`, which for most schedules
is `initial_lr * factor(t, total)`; `initial_lr` is the rate the group was configured with, so every
group is scaled from its own rate. This is `torch.optim.lr_scheduler`'s convention after t calls to
`.step()`; each schedule names the torch scheduler whose values it reproduces, and
tests/unit/test_lr_schedules_reference.py compares them value by value (docs/lr_schedules.md).

A pure function needs no saved state: a resumed run recomputes the rate from the step it resumes
at. Only the initial rates are saved, because the optimizer's checkpoint restores the scheduled
rate of the step it was saved at, not the configured one. `ReduceOnPlateau` reacts to a metric
instead of a clock and also saves its counters.

The rates are logged (`state.log`) as "lr" (group 0) and, with several groups, as "lr/group{i}"
for each group: by the loop on every log step, and by the schedule when a fit starts and when an
epoch-interval or plateau schedule changes them.

Any `torch.optim.lr_scheduler` scheduler itself (warm restarts, polynomial, SequentialLR chains,
...) runs through `trainer.callbacks.torch_schedule.TorchScheduler`; docs/lr_schedules.md says
which to use when.
"""

from __future__ import annotations

import math
import warnings
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from trainer.callbacks.base import Callback
from trainer.state import TrainState, rate_metrics

INTERVALS = ("step", "epoch")


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(name: str, value: Any, minimum: int) -> int:
    _check(_is_int(value) and value >= minimum, name, f"an integer >= {minimum}", value)
    return value


def _ratio(name: str, value: Any) -> float:
    _check(_is_number(value) and 0.0 <= value <= 1.0, name, "in [0, 1]", value)
    return value


def _positive(name: str, value: Any) -> float:
    _check(_is_number(value) and value > 0, name, "a finite number > 0", value)
    return value


class LRSchedule(Callback):
    """Base class: subclasses define `factor(t, total)`, or `rate(base_lr, t, total)` where the
    reference formula is not a plain multiple of the group's initial rate."""

    interval = "step"
    initial_lrs: Sequence[float] = ()  # each group's configured rate, set at fit start
    _saved: dict[str, Any] | None = None  # from load_state_dict, used at the next fit start

    def __init__(self, interval: str = "step") -> None:
        _check(interval in INTERVALS, "interval", "'step' or 'epoch'", interval)
        self.interval = interval

    def factor(self, t: int, total: int) -> float:
        raise NotImplementedError

    def rate(self, base_lr: float, t: int, total: int) -> float:
        return base_lr * self.factor(t, total)

    def rates(self, state: TrainState) -> list[float]:
        if self.interval == "step":
            t, total = state.step, state.max_steps
        else:
            t, total = state.epoch, -(-state.max_steps // state.steps_per_epoch)
        return [self.rate(lr, t, total) for lr in self.initial_lrs]

    def start(self, saved: dict[str, Any]) -> None:
        """Reset per-run counters at fit start, or restore them from `saved` on resume."""

    def set_rates(self, state: TrainState, log: bool = False) -> None:
        """Write `rates(state)` into the optimizer, and log them if `log`. A step-interval schedule
        does not log each step's rate: the loop logs the rates in use on every log step."""
        for group, lr in zip(state.optimizer.param_groups, self.rates(state), strict=True):
            group["lr"] = lr
        if log:
            state.log(rate_metrics(state.optimizer))

    # ---------------------------------------------------------------------------- hooks
    def on_fit_start(self, state: TrainState) -> None:
        saved, self._saved = self._saved or {}, None
        groups = state.optimizer.param_groups
        # `initial_lr` is torch's key: a group a torch scheduler has seen keeps its base rate.
        self.initial_lrs = list(
            saved.get("initial_lrs") or [g.get("initial_lr", g["lr"]) for g in groups]
        )
        for group, lr in zip(groups, self.initial_lrs, strict=True):
            group["initial_lr"] = lr
        self.start(saved)
        self.set_rates(state, log=True)

    def on_epoch_start(self, state: TrainState) -> None:
        if self.interval == "epoch":
            self.set_rates(state, log=True)

    def on_step_start(self, state: TrainState) -> None:
        if self.interval == "step":
            self.set_rates(state)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_lrs": list(self.initial_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = dict(state)


class Constant(LRSchedule):
    """The configured rate throughout."""

    def factor(self, t: int, total: int) -> float:
        return 1.0


class StepDecay(LRSchedule):
    """`gamma ** (t // step_size)`: torch `StepLR`."""

    def __init__(self, step_size: int, gamma: float = 0.1, interval: str = "step") -> None:
        super().__init__(interval)
        self.step_size = _count("step_size", step_size, 1)
        self.gamma = _positive("gamma", gamma)

    def factor(self, t: int, total: int) -> float:
        return self.gamma ** (t // self.step_size)


class MultiStepDecay(LRSchedule):
    """`gamma ** (number of milestones <= t)`: torch `MultiStepLR`."""

    def __init__(
        self, milestones: Sequence[int], gamma: float = 0.1, interval: str = "step"
    ) -> None:
        super().__init__(interval)
        ok = isinstance(milestones, Sequence) and all(_is_int(m) and m >= 1 for m in milestones)
        ok = ok and list(milestones) == sorted(set(milestones))
        _check(ok, "milestones", "a list of increasing integers >= 1", milestones)
        self.milestones = tuple(milestones)
        self.gamma = _positive("gamma", gamma)

    def factor(self, t: int, total: int) -> float:
        return self.gamma ** bisect_right(self.milestones, t)


class ExponentialDecay(LRSchedule):
    """`gamma ** t`: torch `ExponentialLR`."""

    def __init__(self, gamma: float, interval: str = "step") -> None:
        super().__init__(interval)
        self.gamma = _positive("gamma", gamma)

    def factor(self, t: int, total: int) -> float:
        return self.gamma**t


class Cosine(LRSchedule):
    """Cosine from lr to `min_ratio * lr`, reached at t = total (after the last step): torch
    `CosineAnnealingLR(T_max=total, eta_min=min_ratio * lr)`, in its closed form."""

    def __init__(self, min_ratio: float = 0.0, interval: str = "step") -> None:
        super().__init__(interval)
        self.min_ratio = _ratio("min_ratio", min_ratio)

    def rate(self, base_lr: float, t: int, total: int) -> float:
        eta_min = base_lr * self.min_ratio
        return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * min(t, total) / total)) / 2


class WarmupDecay(LRSchedule):
    """Linear warm-up, `(t + 1) / warmup_steps`, reaching 1 at t = warmup_steps - 1; then
    `decay(progress)` from 1 at t = warmup_steps down to `min_ratio`, reached at t = total (after
    the last step). Subclasses define `decay`, falling from 1 at progress 0 to 0 at progress 1."""

    def __init__(
        self, warmup_steps: int = 0, min_ratio: float = 0.0, interval: str = "step"
    ) -> None:
        super().__init__(interval)
        self.warmup_steps = _count("warmup_steps", warmup_steps, 0)
        self.min_ratio = _ratio("min_ratio", min_ratio)

    def decay(self, progress: float) -> float:
        raise NotImplementedError

    def factor(self, t: int, total: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        decay_steps = max(total - self.warmup_steps, 1)
        progress = min((t - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * self.decay(progress)


class WarmupCosine(WarmupDecay):
    """Warm-up, then cosine decay: torch `SequentialLR` of `LinearLR` and `CosineAnnealingLR`."""

    def decay(self, progress: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * progress))


class WarmupLinear(WarmupDecay):
    """Warm-up, then linear decay: torch `SequentialLR` of two `LinearLR`."""

    def decay(self, progress: float) -> float:
        return 1 - progress


class OneCycle(LRSchedule):
    """torch `OneCycleLR` (anneal_strategy="cos", three_phase=False, cycle_momentum=False) with
    `max_lr` = each group's configured rate: cosine from `lr / div_factor` up to `lr` over the first
    `pct_start` of the run, then down to `lr / div_factor / final_div_factor` at the last step."""

    def __init__(
        self,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        interval: str = "step",
    ) -> None:
        super().__init__(interval)
        self.pct_start = _ratio("pct_start", pct_start)
        self.div_factor = _positive("div_factor", div_factor)
        self.final_div_factor = _positive("final_div_factor", final_div_factor)

    @staticmethod
    def _anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def rate(self, base_lr: float, t: int, total: int) -> float:
        # torch's arithmetic, step for step; a phase of length 0 (where torch divides by zero)
        # counts as finished.
        initial = base_lr / self.div_factor
        peak = float(self.pct_start * total) - 1  # the step at which the rate reaches lr
        if t <= peak:
            return self._anneal(initial, base_lr, t / peak if peak > 0 else 1.0)
        length = total - 1 - peak
        pct = (t - peak) / length if length > 0 else 1.0
        return self._anneal(base_lr, initial / self.final_div_factor, pct)


class InverseSqrt(LRSchedule):
    """`lr / sqrt(1 + decay * t)` (torch has no equivalent; tested against this formula)."""

    def __init__(self, decay: float = 0.01, interval: str = "step") -> None:
        super().__init__(interval)
        _check(_is_number(decay) and decay >= 0, "decay", "a finite number >= 0", decay)
        self.decay = decay

    def rate(self, base_lr: float, t: int, total: int) -> float:
        return base_lr / math.sqrt(1 + self.decay * t)


class ReduceOnPlateau(LRSchedule):
    """torch `ReduceLROnPlateau` (threshold_mode="rel") on the metric `monitor`, read in
    `on_eval_end`: after more than `patience` evaluations without improving on the best value by
    the relative `threshold`, every group's rate is multiplied by `factor` (not below `min_lr`,
    and not at all if it would change by `eps` or less), then `cooldown` evaluations are ignored.

    At most one reading per optimizer step, so the test split evaluated after fit (at the step of
    the last validation) does not count. The rates and counters are saved for resume.
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__("step")
        _check(isinstance(monitor, str) and monitor != "", "monitor", "a metric name", monitor)
        _check(mode in ("min", "max"), "mode", "'min' or 'max'", mode)
        _check(_is_number(factor) and 0 <= factor < 1, "factor", "in [0, 1)", factor)
        _check(_is_number(threshold) and threshold >= 0, "threshold", "a number >= 0", threshold)
        _check(_is_number(min_lr) and min_lr >= 0, "min_lr", "a number >= 0", min_lr)
        _check(_is_number(eps) and eps >= 0, "eps", "a number >= 0", eps)
        self.monitor, self.mode, self.reduce_factor = monitor, mode, factor
        self.patience = _count("patience", patience, 0)
        self.cooldown = _count("cooldown", cooldown, 0)
        self.threshold, self.min_lr, self.eps = threshold, min_lr, eps

    def start(self, saved: dict[str, Any]) -> None:
        self.lrs: list[float] = list(saved.get("lrs", self.initial_lrs))
        self.best: float = saved.get("best", math.inf if self.mode == "min" else -math.inf)
        self.bad_evals: int = saved.get("bad_evals", 0)
        self.cooldown_left: int = saved.get("cooldown_left", 0)
        self.last_step: int = saved.get("last_step", -1)

    def rates(self, state: TrainState) -> list[float]:
        return list(self.lrs)

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best * (1.0 - self.threshold)
        return value > self.best * (self.threshold + 1.0)

    def reduced(self, lr: float) -> float:
        new = max(lr * self.reduce_factor, self.min_lr)
        return new if lr - new > self.eps else lr

    def on_eval_end(self, state: TrainState) -> None:
        if self.monitor not in state.metrics:
            warnings.warn(f"ReduceOnPlateau: no metric {self.monitor!r} to monitor", stacklevel=2)
            return
        if state.step == self.last_step:
            return
        self.last_step = state.step
        value = float(state.metrics[self.monitor])
        if self.improved(value):
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_evals = 0  # bad evaluations during the cooldown do not count
        if self.bad_evals > self.patience:
            self.lrs = [self.reduced(lr) for lr in self.lrs]
            self.cooldown_left, self.bad_evals = self.cooldown, 0
            self.set_rates(state, log=True)

    def state_dict(self) -> dict[str, Any]:
        if not hasattr(self, "lrs"):  # before the first fit: nothing to restore
            return super().state_dict()
        return {
            **super().state_dict(),
            "lrs": list(self.lrs),
            "best": self.best,
            "bad_evals": self.bad_evals,
            "cooldown_left": self.cooldown_left,
            "last_step": self.last_step,
        }
