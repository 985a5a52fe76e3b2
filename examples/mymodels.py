"""A user's own model, as `hooktrain model._target_=mymodels.TinyNet` names it: a class that
takes the data's `input_shape` and `num_classes` (given by the trainer) and its own arguments."""

import math

from torch import nn


class TinyNet(nn.Module):
    """One hidden layer on the flattened input."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x):
        return self.net(x)
