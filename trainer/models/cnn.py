"""LeNet-style convolutional classifier (LeCun et al. 1998, LeNet-5).

conv-ReLU-pool per entry of ``channels``, then fc-ReLU-dropout-fc. Picks ``Conv2d``/``MaxPool2d``
for ``(C, H, W)`` samples and ``Conv1d``/``MaxPool1d`` for ``(C, L)``; ``(L,)`` is read as
``(1, L)``. Kernel 3 with padding 1 keeps the size through each conv, so only the 2x pools
shrink it and an 8x8 digit survives two of them (8 -> 4 -> 2). ``batch_norm=True`` puts a
``BatchNorm2d``/``BatchNorm1d`` between each conv and its ReLU (Ioffe & Szegedy 2015).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel


class CNN(nn.Module):
    """LeNet-shaped CNN for 1-D or 2-D inputs.

    ``hidden=0`` drops the hidden fc layer (a single Linear head). Dropout modules are always
    present (``p=0.0`` by default) so a dropout schedule can change ``p`` at run time. With
    ``batch_norm`` the convs have no bias: the BatchNorm after each subtracts the channel mean,
    which would cancel it. The head has no BatchNorm, so its tensor-parallel plan is the same.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = num_classes
        shape = self.input_shape
        if len(shape) == 1:
            shape = (1, shape[0])  # a plain vector is a one-channel signal
        if len(shape) == 3:
            conv, norm, pool = nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d
        elif len(shape) == 2:
            conv, norm, pool = nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d
        else:
            raise ValueError(f"CNN expects input_shape with 1 to 3 dims, got {self.input_shape}")
        self._conv_shape = shape

        layers: list[nn.Module] = []
        in_ch = shape[0]
        for ch in channels:
            layers.append(conv(in_ch, ch, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(norm(ch))
            layers += [nn.ReLU(), pool(2)]
            in_ch = ch
        self.features = nn.Sequential(*layers)

        # Each pool floors the spatial size by 2; padding=1 convs keep it unchanged.
        spatial = [s // 2 ** len(channels) for s in shape[1:]]
        if min(spatial) < 1:
            raise ValueError(
                f"input_shape {self.input_shape} is too small for {len(channels)} 2x poolings"
            )
        flat = in_ch * math.prod(spatial)

        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout)]
            flat = hidden
        head.append(nn.Linear(flat, num_classes))  # last op is a Linear: a fresh tensor
        self.classifier = nn.Sequential(*head)

    def tp_plan(self) -> dict[str, ParallelStyle]:
        """Tensor parallel: the fc pair of the head, colwise then rowwise (one all-reduce). The
        convolutions are small next to it and stay replicated."""
        if len(self.classifier) < 5:  # hidden=0: one Linear, its classes split, then gathered
            return {"classifier.1": ColwiseParallel(output_layouts=Replicate())}
        return {"classifier.1": ColwiseParallel(), "classifier.4": RowwiseParallel()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.input_shape) == 1:
            x = x.unsqueeze(1)  # (B, L) -> (B, 1, L)
        return self.classifier(self.features(x))
