"""Dropout schedules: the dropout rate as a pure function of the step (or epoch).

The callback drives, before every step (``interval="step"``) or epoch (``interval="epoch"``):

- ``p`` of every ``nn.Dropout``-family module (``nn.Dropout``, ``Dropout1d/2d/3d``,
  ``AlphaDropout``, ``FeatureAlphaDropout``), and
- with ``include_attention``, every float attribute named ``attn_dropout`` (``SelfAttention`` in
  `trainer/models/attention.py`, or any module of yours that follows that convention).

Other dropout knobs are left alone (``nn.GRU``'s inter-layer ``dropout``,
``nn.MultiheadAttention.dropout``). With ``pattern``, only modules whose name matches the regex
are driven: ``re.search`` against the dotted name from ``named_modules()`` of the unwrapped model,
that is without the wrapper parts ``module.`` (DDP), ``_orig_mod.`` (torch.compile) and
``_checkpoint_wrapped_module.`` (activation checkpointing). An ``attn_dropout`` is matched by its
owner's name (``blocks.0.attn``), a dropout module by its own (``blocks.0.attn.dropout``,
``net.2``); anchor with ``^...$`` for exact names. A schedule that drives no module is an error.

Let ``t`` be the step about to run (``state.step``: optimizer steps completed) or, with
``interval="epoch"``, the epoch about to run (``state.epoch``); ``T`` the length of the run in the
same unit (``max_steps``, or ``ceil(max_steps / steps_per_epoch)`` epochs); ``D = until_step``, or
``T`` when ``until_step`` is null. ``s = start_value``, ``e = end_value``::

    constant  p(t) = s
    linear    p(t) = s + (e - s) * min(t / D, 1)
    cosine    p(t) = e + (s - e) * (1 + cos(pi * min(t / D, 1))) / 2
    step      p(t) = s before milestones[0], values[i] from milestones[i] on (until the next one)
    early     t < D: s (early_mode=constant) or s + (e - s) * t / D (early_mode=linear);
              t >= D: e
    late      t < D: s;  t >= D: e

``early`` and ``late`` are Liu et al. 2023, "Dropout Reduces Underfitting": early dropout uses rate
``p = start_value`` for the first ``until_step`` steps (held, or decreased linearly) and then
``end_value = 0``; late dropout uses ``start_value = 0`` for the first ``until_step`` steps and then
``p = end_value``. Both need ``until_step``; ``early`` requires ``start_value > end_value`` and
``late`` ``end_value > start_value`` (the defaults 0.1 -> 0.0 are early dropout, so a late schedule
must set both values).

The rate is applied in ``on_fit_start`` (so a resumed run starts with the rate of the step it
resumes at) and then in ``on_step_start`` (or ``on_epoch_start``), and logged as ``dropout/p``.
Being a pure function of the counters, it needs no saved state: ``state_dict()`` is ``{}``.

DDP keeps the user's module objects and FSDP2/TP modify the model in place, so setting the rate
on this rank's modules is all there is to do on every strategy. Under ``compile=true`` a changed
rate may trigger a recompilation (Dynamo guards on module attributes); prefer a piecewise-constant
schedule (``constant``, ``step``, ``early`` constant, ``late``) or ``interval="epoch"`` there.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from trainer.callbacks.base import Callback
from trainer.distributed.parallelize import unwrap
from trainer.state import TrainState

SCHEDULES = ("constant", "linear", "cosine", "step", "early", "late")
INTERVALS = ("step", "epoch")
EARLY_MODES = ("constant", "linear")
# Name components that wrappers insert between a model's own module names.
WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


class DropoutSchedule(Callback):
    """Set every (or every matching) dropout rate from a schedule; see the module docstring.

    Args:
        schedule: constant | linear | cosine | step | early | late.
        start_value: the rate at t = 0 (and before the first milestone for ``step``).
        end_value: the rate at t >= until_step (linear, cosine, early, late).
        until_step: ``D`` above, in steps or epochs (``interval``); null means the whole run for
            linear and cosine; required for early and late.
        milestones: ``step`` only: increasing steps (or epochs) where the rate changes.
        values: ``step`` only: the rate from each milestone on (same length as milestones).
        early_mode: ``early`` only: constant (hold start_value) or linear (decrease to end_value).
        interval: step (update before each optimizer step) or epoch (before each epoch).
        pattern: a regex; only modules whose unwrapped name matches it (``re.search``) are driven.
        include_attention: also drive float ``attn_dropout`` attributes.
    """

    def __init__(
        self,
        schedule: str = "constant",
        start_value: float = 0.1,
        end_value: float = 0.0,
        until_step: int | None = None,
        milestones: Sequence[int] = (),
        values: Sequence[float] = (),
        early_mode: str = "constant",
        interval: str = "step",
        pattern: str | None = None,
        include_attention: bool = True,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        for name, rate in (("start_value", start_value), ("end_value", end_value)):
            _check_rate(name, rate)
        if until_step is not None and (
            isinstance(until_step, bool) or not isinstance(until_step, int) or until_step < 1
        ):
            raise ValueError(f"until_step must be an int >= 1 or null, got {until_step!r}")
        milestones = list(milestones)
        values = list(values)
        if schedule == "step":
            if not milestones:
                raise ValueError("milestones: schedule=step needs at least one milestone")
            if len(values) != len(milestones):
                raise ValueError(
                    f"values must have one rate per milestone: {len(milestones)} milestones, "
                    f"{len(values)} values"
                )
            for m in milestones:
                if isinstance(m, bool) or not isinstance(m, int) or m < 0:
                    raise ValueError(f"milestones must be ints >= 0, got {milestones!r}")
            if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
                raise ValueError(f"milestones must be strictly increasing, got {milestones!r}")
            for i, rate in enumerate(values):
                _check_rate(f"values[{i}]", rate)
        elif milestones or values:
            raise ValueError(
                f"milestones and values are used by schedule=step only (schedule={schedule})"
            )
        if schedule in ("early", "late"):
            if until_step is None:
                raise ValueError(f"until_step: schedule={schedule} needs the step of the switch")
            if schedule == "early" and not start_value > end_value:
                raise ValueError(
                    f"start_value: early dropout starts above end_value; got "
                    f"start_value={start_value}, end_value={end_value}"
                )
            if schedule == "late" and not end_value > start_value:
                raise ValueError(
                    f"end_value: late dropout ends above start_value (Liu et al.: start_value=0, "
                    f"end_value=p); got start_value={start_value}, end_value={end_value}"
                )
        if early_mode not in EARLY_MODES:
            raise ValueError(
                f"early_mode must be one of {', '.join(EARLY_MODES)}; got {early_mode!r}"
            )
        if interval not in INTERVALS:
            raise ValueError(f"interval must be one of {', '.join(INTERVALS)}; got {interval!r}")
        if pattern is not None:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"pattern {pattern!r} is not a valid regex ({err})") from None
        if not isinstance(include_attention, bool):
            raise ValueError(f"include_attention must be true or false, got {include_attention!r}")
        self.schedule = schedule
        self.start_value = float(start_value)
        self.end_value = float(end_value)
        self.until_step = until_step
        self.milestones = milestones
        self.values = [float(v) for v in values]
        self.early_mode = early_mode
        self.interval = interval
        self.pattern = pattern
        self.include_attention = include_attention
        # (module, attribute) pairs found in on_fit_start
        self.targets: list[tuple[nn.Module, str]] = []
        self.target_names: list[str] = []
        self.current: float | None = None

    # ------------------------------------------------------------------------- the schedule
    def rate(self, t: int, total: int) -> float:
        """The rate at step (or epoch) `t` of a run of `total` steps (or epochs)."""
        s, e = self.start_value, self.end_value
        length = self.until_step or max(total, 1)
        progress = min(t / length, 1.0)
        if self.schedule == "constant":
            return s
        if self.schedule == "linear":
            return s + (e - s) * progress
        if self.schedule == "cosine":
            return e + (s - e) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            i = bisect.bisect_right(self.milestones, t)
            return s if i == 0 else self.values[i - 1]
        if t >= length:
            return e
        if self.schedule == "early" and self.early_mode == "linear":
            return s + (e - s) * progress
        return s  # early (constant) and late before the switch

    def position(self, state: TrainState) -> tuple[int, int]:
        """(t, T) for `state` in the unit of `interval`."""
        if self.interval == "epoch":
            return state.epoch, math.ceil(state.max_steps / max(state.steps_per_epoch, 1))
        return state.step, state.max_steps

    # ------------------------------------------------------------------------- hooks
    def on_fit_start(self, state: TrainState) -> None:
        self.targets, self.target_names = find_targets(
            state.model, self.pattern, self.include_attention
        )
        if not self.targets:
            found, _ = find_targets(state.model, None, self.include_attention)
            names = [n for n in _module_names(state.model) if n]
            raise RuntimeError(
                "DropoutSchedule: no dropout module "
                + (f"matches pattern {self.pattern!r}" if self.pattern else "in the model")
                + f" ({len(found)} dropout rate(s) in all, include_attention="
                f"{self.include_attention}); module names: {', '.join(names[:40])}"
                + (" ..." if len(names) > 40 else "")
            )
        self._apply(state)

    def on_epoch_start(self, state: TrainState) -> None:
        if self.interval == "epoch":
            self._apply(state)

    def on_step_start(self, state: TrainState) -> None:
        if self.interval == "step":
            self._apply(state)

    def _apply(self, state: TrainState) -> None:
        value = self.rate(*self.position(state))
        for module, attr in self.targets:
            setattr(module, attr, value)
        self.current = value
        state.log({"dropout/p": value})

    def state_dict(self) -> dict[str, Any]:
        """Empty on purpose: the rate is recomputed from the step (or epoch) on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def canonical_name(name: str) -> str:
    """`name` without the parts wrappers insert (see WRAPPER_PARTS; DDP's `module.` is removed by
    unwrapping the root)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def _module_names(model: nn.Module) -> list[str]:
    return [canonical_name(n) for n, _ in unwrap(model).named_modules()]


def find_targets(
    model: nn.Module, pattern: str | None, include_attention: bool
) -> tuple[list[tuple[nn.Module, str]], list[str]]:
    """The (module, attribute) pairs a schedule drives, and their display names
    (``net.2.p``, ``blocks.0.attn.attn_dropout``)."""
    regex = re.compile(pattern) if pattern is not None else None
    targets: list[tuple[nn.Module, str]] = []
    names: list[str] = []
    seen: set[int] = set()
    for raw, module in unwrap(model).named_modules():
        name = canonical_name(raw)
        if id(module) in seen or (regex is not None and not regex.search(name)):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            attr = "p"
        elif include_attention and isinstance(getattr(module, "attn_dropout", None), float):
            attr = "attn_dropout"
        else:
            continue
        seen.add(id(module))
        targets.append((module, attr))
        names.append(f"{name}.{attr}" if name else attr)
    return targets, names


def _check_rate(name: str, rate: Any) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be a dropout rate in [0, 1], got {rate!r}")
