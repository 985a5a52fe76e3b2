"""Models as a user would write them (`model._target_: tests.user_models.<Name>`, with "tests."
in allowed_targets), for the tests of what the trainer refuses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from trainer.data.datasets import DataSplits


class BatchNormMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear: a norm over the features between two Linears."""

    def __init__(self, *, input_shape: Sequence[int], num_classes: int, hidden: int = 48) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn(self.fc1(x.flatten(1)))))


class FixedWidth(nn.Module):
    """A linear classifier whose author hard-coded its input width instead of reading
    `input_shape`: it fits only data of that width."""

    def __init__(self, *, input_shape: Sequence[int], num_classes: int, width: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def no_val_split(num_samples: int = 96, features: int = 8, num_classes: int = 4) -> DataSplits:
    """A dataset builder whose data comes with no validation split."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_samples, features, generator=gen)
    y = torch.randint(0, num_classes, (num_samples,), generator=gen)
    empty = TensorDataset(x[:0], y[:0])
    return DataSplits(TensorDataset(x, y), empty, empty, (features,), num_classes)
