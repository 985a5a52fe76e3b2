"""GRU sequence classifier (Cho et al. 2014, gated recurrent unit).

A sample is read as a sequence by `trainer.models.sequence.to_sequence` (image rows, signal
steps, or vector entries); the last layer's final hidden state feeds a linear head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from .sequence import sequence_shape, to_sequence


class GRUClassifier(nn.Module):
    """``nn.GRU`` (batch_first) -> dropout -> Linear on the last hidden state.

    ``dropout`` is applied between stacked GRU layers (only when ``num_layers > 1``, where
    ``nn.GRU`` uses it) and before the head (``self.dropout``).
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: int = 128,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = num_classes
        _, features = sequence_shape(self.input_shape)
        self.gru = nn.GRU(
            features,
            hidden,
            num_layers=num_layers,
            batch_first=True,
            # nn.GRU warns when given inter-layer dropout with a single layer.
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def tp_plan(self) -> dict[str, ParallelStyle]:
        """Tensor parallel: the head's classes are split over the ranks and gathered. `nn.GRU`
        keeps its gates in fused weights that `parallelize_module` cannot split, so the
        recurrence stays replicated: tp gains little for this model, but runs."""
        return {"head": ColwiseParallel(output_layouts=Replicate())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(to_sequence(x))  # h: (num_layers, B, hidden)
        return self.head(self.dropout(h[-1]))
