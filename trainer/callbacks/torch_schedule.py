"""Any `torch.optim.lr_scheduler` scheduler as the run's schedule, built on its optimizer.

    schedule:
      _target_: trainer.callbacks.torch_schedule.TorchScheduler
      interval: step                # step | epoch: when scheduler.step() is called
      scheduler:
        _target_: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts
        _partial_: true             # Hydra hands over the class and its arguments, not an object
        T_0: 100

The scheduler node is `_partial_`: the optimizer does not exist when the config is built, so the
scheduler is created at fit start, as `scheduler(optimizer=...)`, and then stepped as torch's own
loop steps it: after each optimizer step (`on_step_end`) or each epoch (`on_epoch_end`), and
`ReduceLROnPlateau` after each validation with the metric `monitor` (`on_eval_end`).

`auto` as `total_steps`, `T_max` or `total_iters` is the length of the stretch the scheduler runs
for, in its interval's units: the run's steps (or epochs); inside `SequentialLR`, the steps from
its milestone to the next one (or to the end). Schedulers that take schedulers (`SequentialLR`,
`ChainedScheduler`) take them as a list of such nodes in `schedulers`, built on the same
optimizer first.

Resume: the scheduler's own `state_dict` is saved. A resumed fit builds the scheduler again, which
takes torch's initial step and overwrites the optimizer's rates (and momentum, for OneCycleLR),
loads the saved state, and then puts back the optimizer's values of the checkpoint: the rates of
the step it was saved at.

Rates are logged as hooktrain's own schedules log them (trainer/callbacks/lr_schedule.py): at fit
start, whenever an epoch-interval or metric-driven scheduler steps, and by the loop on every log
step.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau, SequentialLR

from trainer.callbacks.base import Callback
from trainer.errors import ConfigError
from trainer.state import TrainState, rate_metrics
from trainer.targets import check_target, resolve_target

INTERVALS = ("step", "epoch")
AUTO = "auto"
LENGTHS = ("total_steps", "T_max", "total_iters")  # the arguments that take `auto`


def _scheduler_class(target: Any, name: str, key: str) -> type[LRScheduler]:
    if not (inspect.isclass(target) and issubclass(target, LRScheduler)):
        raise ConfigError(
            f"{key}._target_: {name} is not a learning-rate scheduler (a "
            "torch.optim.lr_scheduler.LRScheduler such as StepLR, or ReduceLROnPlateau)"
        )
    return target


def _check_arguments(target: type[LRScheduler], interval: Any, monitor: Any, key: str) -> None:
    """TorchScheduler's own arguments, which depend on the scheduler: a monitor for
    ReduceLROnPlateau, and for it alone."""
    if interval not in INTERVALS:
        raise ConfigError(f"{key}.interval: must be step or epoch, got {interval!r}")
    if issubclass(target, ReduceLROnPlateau):
        if not (isinstance(monitor, str) and monitor):
            raise ConfigError(
                f"{key}.monitor: ReduceLROnPlateau needs the metric it watches, e.g. val/loss"
            )
    elif monitor is not None:
        raise ConfigError(f"{key}.monitor: {target.__name__} reads no metric; remove monitor")


def _check_node(node: Any, key: str, allowed: Sequence[str], inside: str = "") -> None:
    """A scheduler node: allowed target, known arguments of the right types, a scheduler class;
    the nodes in its `schedulers` likewise."""
    if not (isinstance(node, Mapping) and "_target_" in node and node.get("_partial_") is True):
        raise ConfigError(
            f"{key}: must be a `_target_` node with `_partial_: true` (the scheduler is built on "
            "the optimizer at fit start)"
        )
    target = _scheduler_class(resolve_target(node["_target_"], key, allowed), node["_target_"], key)
    # `auto` stands for a count filled in at fit start; the rest is checked as any other node.
    checked = {k: 1 if k in LENGTHS and v == AUTO else v for k, v in node.items()}
    check_target(checked, key, allowed, injected=("optimizer",))
    if inside and issubclass(target, ReduceLROnPlateau):
        raise ConfigError(
            f"{key}._target_: {inside} cannot step ReduceLROnPlateau (it needs a metric)"
        )
    for i, child in enumerate(node.get("schedulers") or ()):
        _check_node(child, f"{key}.schedulers[{i}]", allowed, inside=target.__name__)


def _segments(factory: Callable[..., LRScheduler], count: int, length: int) -> list[int]:
    """The stretch each of `count` nested schedulers runs for: between SequentialLR's milestones,
    else (ChainedScheduler) the whole length."""
    if not issubclass(factory.func, SequentialLR):
        return [length] * count
    bounds = [0, *factory.keywords["milestones"], length]
    # A milestone past the run's end leaves a scheduler that never runs: any length does.
    return [max(end - start, 1) for start, end in pairwise(bounds)]


def build_scheduler(
    factory: Callable[..., LRScheduler], optimizer: Optimizer, length: int
) -> LRScheduler:
    """`factory(optimizer=optimizer)` with `auto` lengths filled in and nested factories built."""
    keywords = getattr(factory, "keywords", {})
    filled: dict[str, Any] = {k: length for k in LENGTHS if keywords.get(k) == AUTO}
    if "schedulers" in keywords:
        nested = keywords["schedulers"]
        filled["schedulers"] = [
            build_scheduler(f, optimizer, n)
            for f, n in zip(nested, _segments(factory, len(nested), length), strict=True)
        ]
    return factory(optimizer=optimizer, **filled)


class TorchScheduler(Callback):
    """`scheduler`: a torch scheduler's class with its arguments (a `_partial_` node); `interval`:
    step it after every optimizer step or every epoch; `monitor`: the metric ReduceLROnPlateau
    reads after each validation (it alone takes one, and it ignores `interval`)."""

    def __init__(
        self,
        scheduler: Callable[..., LRScheduler] | Mapping[str, Any],
        interval: str = "step",
        monitor: str | None = None,
    ) -> None:
        # Config validation sees the node (a mapping); Hydra hands over the partial it makes.
        target = getattr(scheduler, "func", scheduler)
        name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"
        _check_arguments(
            _scheduler_class(target, name, "schedule.scheduler"), interval, monitor, "schedule"
        )
        self.metric_driven = issubclass(target, ReduceLROnPlateau)
        self.factory, self.interval, self.monitor = scheduler, interval, monitor
        self.scheduler: LRScheduler | None = None  # built at fit start
        self.last_step = -1  # the step of the last metric reading
        self._saved: dict[str, Any] | None = None  # from load_state_dict, used at fit start

    @classmethod
    def check_config(cls, node: Mapping[str, Any], key: str, allowed: Sequence[str]) -> None:
        """Config validation of the nested scheduler node(s), which the check of this node's own
        keys does not look into: same allowlist and argument checks as any `_target_` node."""
        _check_node(node.get("scheduler"), f"{key}.scheduler", allowed)
        target = resolve_target(node["scheduler"]["_target_"], f"{key}.scheduler", allowed)
        _check_arguments(target, node.get("interval", INTERVALS[0]), node.get("monitor"), key)

    # ---------------------------------------------------------------------------- hooks
    def on_fit_start(self, state: TrainState) -> None:
        saved, self._saved = self._saved, None
        groups = state.optimizer.param_groups
        # Resumed, the optimizer holds the checkpoint's rates (and momentum); building the
        # scheduler overwrites them with its first step's, so they are put back after loading.
        checkpointed = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        length = state.max_steps
        if self.interval == "epoch":
            length = -(-state.max_steps // state.steps_per_epoch)
        # A fit of no steps (init_from with max_epochs=0) still builds a schedule, of one step:
        # OneCycleLR and others refuse a length of 0.
        self.scheduler = build_scheduler(self.factory, state.optimizer, max(length, 1))
        self.last_step = -1
        if saved:
            self.scheduler.load_state_dict(saved["scheduler"])
            self.last_step = saved["last_step"]
            for group, values in zip(groups, checkpointed, strict=True):
                group.update(values)
        state.log(rate_metrics(state.optimizer))

    def on_step_end(self, state: TrainState) -> None:
        if self.interval == "step" and not self.metric_driven:
            self.scheduler.step()

    def on_epoch_end(self, state: TrainState) -> None:
        if self.interval == "epoch" and not self.metric_driven:
            self.scheduler.step()
            state.log(rate_metrics(state.optimizer))

    def on_eval_end(self, state: TrainState) -> None:
        # At most one reading per optimizer step: the test split evaluated after fit (at the step
        # of the last validation) does not count.
        if not self.metric_driven or state.step == self.last_step:
            return
        if self.monitor not in state.metrics:
            warnings.warn(f"TorchScheduler: no metric {self.monitor!r} to monitor", stacklevel=2)
            return
        self.last_step = state.step
        before = rate_metrics(state.optimizer)
        self.scheduler.step(float(state.metrics[self.monitor]))
        if rate_metrics(state.optimizer) != before:
            state.log(rate_metrics(state.optimizer))

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is None:  # before the first fit: nothing to restore
            return {}
        return {"scheduler": self.scheduler.state_dict(), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = dict(state)
