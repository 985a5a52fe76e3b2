"""Multi-layer perceptron classifier (the classic fully connected net, Rumelhart et al. 1986)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear.

    The ``nn.Dropout`` modules are always present (``p=0.0`` by default) so a dropout schedule
    can change their ``p`` at run time. ``batch_norm=True`` puts a ``BatchNorm1d`` between each
    hidden Linear and its ReLU, and drops those Linears' biases (the BatchNorm subtracts the
    mean, which would cancel them). Tensor parallelism pairs the hidden Linears and refuses a
    BatchNorm between them (it would see one rank's share of the features).
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = num_classes
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(self.input_shape)
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))  # last op is a Linear: a fresh tensor
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
