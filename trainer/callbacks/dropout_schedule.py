"""Dropout schedules: the dropout rate as a pure function of the step (or epoch).

`RateSchedule` is the schedule and its hooks; `DropoutSchedule` drives dropout with it, and
`trainer.callbacks.stochastic_depth.StochasticDepthSchedule` the drop-path rates of the
transformer blocks. `DropoutSchedule` drives, before every step (``interval="step"``) or epoch
(``interval="epoch"``):

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
    early     t < D: s (early_mode=constant), or s + (e - s) * t / (D - 1) (early_mode=linear;
              s when D = 1);  t >= D: e
    late      t < D: s;  t >= D: e

``early`` and ``late`` are Liu et al. 2023, "Dropout Reduces Underfitting", as their code defines
them (``drop_scheduler.py`` of facebookresearch/dropout: one rate per iteration ``t``, the
optimizer steps done, which is ``state.step`` here): early dropout uses rate ``p = start_value``
for the first ``until_step`` steps, held (``np.full(D, p)``) or decreased linearly
(``np.linspace(p, 0, D)``, which reaches 0 at step D - 1), and then ``end_value = 0``; late
dropout uses ``start_value = 0`` for the first ``until_step`` steps and then ``p = end_value``.
Both need ``until_step``; ``early`` requires ``start_value > end_value`` and ``late``
``end_value > start_value`` (the defaults 0.1 -> 0.0 are early dropout, so a late schedule must
set both values).

The rate is applied in ``on_fit_start`` (so a resumed run starts with the rate of the step it
resumes at) and then in ``on_step_start`` (or ``on_epoch_start``), and logged as ``dropout/p``.
It is a pure function of the counters, so a resume recomputes it; the checkpoint holds the
schedule's definition (``state_dict()``), and a run that resumes with another definition is
warned which keys changed (the rates then follow this run's configuration).

DDP keeps the user's module objects and FSDP2/TP modify the model in place, so setting the rate
on this rank's modules is all there is to do on every strategy. Under ``compile=true`` a changed
rate may trigger a recompilation (Dynamo guards on module attributes); prefer a piecewise-constant
schedule (``constant``, ``step``, ``early`` constant, ``late``) or ``interval="epoch"`` there.
"""

from __future__ import annotations

import bisect
import math
import re
import warnings
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


class RateSchedule(Callback):
    """A rate from a schedule (the module docstring), set on the modules `find_targets` returns.

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
    """

    metric = "rate"  # the key the rate is logged under
    what = "module"  # what the schedule drives, for the message when the model has none

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
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        for name, rate in (("start_value", start_value), ("end_value", end_value)):
            self.check_rate(name, rate)
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
                self.check_rate(f"values[{i}]", rate)
        elif milestones or values:
            raise ValueError(
                f"milestones and values are used by schedule=step only (schedule={schedule})"
            )
        if schedule in ("early", "late"):
            if until_step is None:
                raise ValueError(f"until_step: schedule={schedule} needs the step of the switch")
            if schedule == "early" and not start_value > end_value:
                raise ValueError(
                    f"start_value: an early schedule starts above end_value; got "
                    f"start_value={start_value}, end_value={end_value}"
                )
            if schedule == "late" and not end_value > start_value:
                raise ValueError(
                    f"end_value: a late schedule ends above start_value (Liu et al.: "
                    f"start_value=0, end_value=p); got start_value={start_value}, "
                    f"end_value={end_value}"
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
        self.schedule = schedule
        self.start_value = float(start_value)
        self.end_value = float(end_value)
        self.until_step = until_step
        self.milestones = milestones
        self.values = [float(v) for v in values]
        self.early_mode = early_mode
        self.interval = interval
        self.pattern = pattern
        # (module, attribute, scale) found in on_fit_start: the attribute is set to rate * scale
        self.targets: list[tuple[nn.Module, str, float]] = []
        self.target_names: list[str] = []
        self.current: float | None = None
        self._saved_definition: dict[str, Any] | None = None  # from a checkpoint

    @staticmethod
    def check_rate(name: str, rate: Any) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be a dropout rate in [0, 1], got {rate!r}")

    def find_targets(
        self, model: nn.Module, pattern: str | None
    ) -> tuple[list[tuple[nn.Module, str, float]], list[str]]:
        """The (module, attribute, scale) triples this schedule drives in `model` (those whose
        name `pattern` matches, if given), and their display names."""
        raise NotImplementedError

    def search_note(self) -> str:
        """What else decided the search, for the message when nothing matches."""
        return ""

    def definition(self) -> dict[str, Any]:
        """The arguments that define the schedule (what a checkpoint records)."""
        return {
            "schedule": self.schedule,
            "start_value": self.start_value,
            "end_value": self.end_value,
            "until_step": self.until_step,
            "milestones": list(self.milestones),
            "values": list(self.values),
            "early_mode": self.early_mode,
            "interval": self.interval,
            "pattern": self.pattern,
        }

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
            # np.linspace(s, e, D)[t], as Liu et al. index it: e is reached at t = D - 1
            return s + (e - s) * t / (length - 1) if length > 1 else s
        return s  # early (constant) and late before the switch

    def position(self, state: TrainState) -> tuple[int, int]:
        """(t, T) for `state` in the unit of `interval`."""
        if self.interval == "epoch":
            return state.epoch, math.ceil(state.max_steps / max(state.steps_per_epoch, 1))
        return state.step, state.max_steps

    # ------------------------------------------------------------------------- hooks
    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if the model has nothing this schedule can set. The trainer calls it
        once the model is built, so that a config naming the wrong model is a config error."""
        if self.find_targets(model, self.pattern)[0]:
            return
        found, _ = self.find_targets(model, None)
        names = [n for n in _module_names(model) if n]
        raise ValueError(
            f"{type(self).__name__}: no {self.what} "
            + (f"matches pattern {self.pattern!r}" if self.pattern else "in the model")
            + f" ({len(found)} in all{self.search_note()}); module names: "
            + ", ".join(names[:40])
            + (" ..." if len(names) > 40 else "")
        )

    def on_fit_start(self, state: TrainState) -> None:
        self.check_model(state.model)
        self.targets, self.target_names = self.find_targets(state.model, self.pattern)
        self._warn_if_redefined()
        self._apply(state)

    def _warn_if_redefined(self) -> None:
        saved, self._saved_definition = self._saved_definition, None
        now = self.definition()
        changed = sorted(k for k in now if saved is not None and saved.get(k) != now[k])
        if changed:
            warnings.warn(
                f"{type(self).__name__}: the checkpoint's schedule had "
                + ", ".join(f"{k}={saved[k]!r}" for k in changed)
                + "; this run has "
                + ", ".join(f"{k}={now[k]!r}" for k in changed)
                + ", which the rates follow from the resumed step on",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_epoch_start(self, state: TrainState) -> None:
        if self.interval == "epoch":
            self._apply(state)

    def on_step_start(self, state: TrainState) -> None:
        if self.interval == "step":
            self._apply(state)

    def _apply(self, state: TrainState) -> None:
        value = self.rate(*self.position(state))
        for module, attr, scale in self.targets:
            setattr(module, attr, value * scale)
        self.current = value
        state.log({self.metric: value})

    def state_dict(self) -> dict[str, Any]:
        """The schedule's definition; the rate itself is recomputed from the step on resume."""
        return {"definition": self.definition()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved_definition = state.get("definition")


class DropoutSchedule(RateSchedule):
    """Set every (or every matching) dropout rate from a schedule; see the module docstring.

    Takes `RateSchedule`'s arguments, and:
        include_attention: also drive float ``attn_dropout`` attributes.
    """

    metric = "dropout/p"
    what = "dropout module"

    # The arguments are spelled out (not *args, **kwargs) so that config validation sees them.
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
        super().__init__(
            schedule, start_value, end_value, until_step, milestones, values, early_mode,
            interval, pattern,
        )  # fmt: skip
        if not isinstance(include_attention, bool):
            raise ValueError(f"include_attention must be true or false, got {include_attention!r}")
        self.include_attention = include_attention

    def find_targets(
        self, model: nn.Module, pattern: str | None
    ) -> tuple[list[tuple[nn.Module, str, float]], list[str]]:
        return find_targets(model, pattern, self.include_attention)

    def search_note(self) -> str:
        return f", include_attention={self.include_attention}"

    def definition(self) -> dict[str, Any]:
        return {**super().definition(), "include_attention": self.include_attention}


def canonical_name(name: str) -> str:
    """`name` without the parts wrappers insert (see WRAPPER_PARTS; DDP's `module.` is removed by
    unwrapping the root)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def _module_names(model: nn.Module) -> list[str]:
    return [canonical_name(n) for n, _ in unwrap(model).named_modules()]


def named_modules(model: nn.Module, pattern: str | None) -> list[tuple[str, nn.Module]]:
    """(canonical name, module) of each module of the unwrapped `model` once, in order; with
    `pattern`, those whose name it matches (``re.search``)."""
    regex = re.compile(pattern) if pattern is not None else None
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for raw, module in unwrap(model).named_modules():
        name = canonical_name(raw)
        if id(module) in seen or (regex is not None and not regex.search(name)):
            continue
        seen.add(id(module))
        found.append((name, module))
    return found


def find_targets(
    model: nn.Module, pattern: str | None, include_attention: bool
) -> tuple[list[tuple[nn.Module, str, float]], list[str]]:
    """The (module, attribute, 1.0) triples a dropout schedule drives, and their display names
    (``net.2.p``, ``blocks.0.attn.attn_dropout``)."""
    targets: list[tuple[nn.Module, str, float]] = []
    names: list[str] = []
    for name, module in named_modules(model, pattern):
        if isinstance(module, nn.modules.dropout._DropoutNd):
            attr = "p"
        elif include_attention and isinstance(getattr(module, "attn_dropout", None), float):
            attr = "attn_dropout"
        else:
            continue
        targets.append((module, attr, 1.0))
        names.append(f"{name}.{attr}" if name else attr)
    return targets, names
