"""Stochastic depth schedules: early and late stochastic depth (Liu et al. 2023).

`StochasticDepthSchedule` is `DropoutSchedule`'s sibling: the same schedules, formulas, interval
and ``pattern`` (`trainer/callbacks/dropout_schedule.py`), applied to the model's drop-path rate
instead of its dropout. The scheduled value ``r(t)`` is the model's rate, and every `DropPath`
module (`trainer/models/drop_path.py`; one per transformer block) gets ``r(t)`` times its
``depth_scale``: the same ``r(t)`` in every block (``model.drop_path_rule=constant``) or
``r(t) * i / (depth - 1)`` in block ``i`` (``linear``), as Liu et al. re-spread the rate over the
blocks with ``linspace(0, r, depth)`` whenever it changes. ``pattern`` matches the modules' names
(``blocks.3.drop_path``).

Early stochastic depth (``schedule=early``, ``start_value=r``, ``end_value=0``): rate ``r`` for
the first ``until_step`` steps (held, or ``early_mode=linear``: ``np.linspace(r, 0, D)``), then 0;
late (``schedule=late``, ``start_value=0``, ``end_value=r``): 0 for the first ``until_step``
steps, then ``r``. The model's own ``drop_path`` is the rate outside the schedule (evaluation is
unaffected: `DropPath` is the identity in eval mode); the schedule overrides it from the first
step. Rates are in [0, 1): a rate of 1 would leave nothing to rescale.

Logged as ``drop_path/rate``; ``state_dict()`` holds the schedule's definition, as for dropout.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from trainer.callbacks.dropout_schedule import RateSchedule, named_modules
from trainer.models.drop_path import DropPath, check_rate


class StochasticDepthSchedule(RateSchedule):
    """Set every (or every matching) block's drop-path rate from a schedule; see the module
    docstring. Takes `RateSchedule`'s arguments."""

    metric = "drop_path/rate"
    what = "DropPath module (TransformerClassifier and TinyGPT have one per block)"

    @staticmethod
    def check_rate(name: str, rate: Any) -> None:
        check_rate(name, rate)

    def find_targets(
        self, model: nn.Module, pattern: str | None
    ) -> tuple[list[tuple[nn.Module, str, float]], list[str]]:
        found = [(n, m) for n, m in named_modules(model, pattern) if isinstance(m, DropPath)]
        return [(m, "p", m.depth_scale) for _, m in found], [f"{n}.p" for n, _ in found]
