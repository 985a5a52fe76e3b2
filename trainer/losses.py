"""What a training step minimizes: the `loss` config node (`recipes/loss/`).

    loss:
      _target_: trainer.losses.CrossEntropy      # the default
      label_smoothing: 0.0

A loss is a `Loss`: built once from its node, handed the run's parts once by `setup` (where a
distillation loss builds and loads its teacher, trainer/compress/distill.py), then called on
every micro-batch as `loss(logits, targets, inputs)` -> a scalar tensor, so that `train_step`
treats every loss alike. Logits are (B, C) against targets (B,) for classification, (B, T, V)
against (B, T) for language models.

Evaluation does not use it: val/ and test/ loss is always the plain cross-entropy
(`flat_cross_entropy`), so that runs trained with different losses compare on one scale, while
train/loss is the value the step minimized.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from trainer.errors import require
from trainer.targets import check_target, resolve_target

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from trainer.config import TrainConfig
    from trainer.data.datasets import DataSplits
    from trainer.distributed.env import DistEnv


def flat_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """One loss for both tasks: (B, C) vs (B,) for classification, (B, T, V) vs (B, T) for LMs.
    In fp32 whatever the autocast dtype of the logits."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(),
        targets.flatten(),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


class Loss:
    """The base of every training loss; a `loss._target_` must name a subclass."""

    def setup(
        self, cfg: TrainConfig, env: DistEnv, mesh: DeviceMesh | None, splits: DataSplits
    ) -> None:
        """Called once on every rank by `build_trainer`, after the model is wrapped and before
        the first step, with the run's config, process layout, device mesh and data. Nothing to
        do for most losses."""

    def __call__(
        self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(Loss):
    """Cross-entropy of the logits against the targets (torch's `label_smoothing`)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def __call__(
        self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor
    ) -> torch.Tensor:
        return flat_cross_entropy(logits, targets, label_smoothing=self.label_smoothing)


def check_loss(node: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """The `loss` node: an allowed `_target_` that is a `Loss` subclass, with known arguments of
    the right types (and what the loss checks itself, e.g. a distillation's alpha)."""
    require(isinstance(node, Mapping) and "_target_" in node, "loss", "needs a `_target_`")
    target = resolve_target(node["_target_"], "loss", allowed)
    require(
        inspect.isclass(target) and issubclass(target, Loss),
        "loss._target_",
        f"{node['_target_']} is not a loss (a subclass of trainer.losses.Loss, called as "
        "loss(logits, targets, inputs)); e.g. trainer.losses.CrossEntropy",
    )
    check_target(node, "loss", allowed)
