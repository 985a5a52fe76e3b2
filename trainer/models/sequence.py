"""Turn one sample into a token sequence for the recurrent and attention classifiers.

One rule, shared by `GRUClassifier` and `TransformerClassifier` so both read data the same way:

- ``(C, H, W)`` image  -> ``T = H`` rows,  ``F = C * W`` features per row
- ``(C, L)`` signal    -> ``T = L`` steps, ``F = C`` features per step
- ``(L,)`` vector      -> ``T = L`` steps, ``F = 1``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sequence_shape(input_shape: Sequence[int]) -> tuple[int, int]:
    """Return ``(T, F)`` for a sample of shape `input_shape` (no batch dim)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        c, h, w = shape
        return h, c * w
    if len(shape) == 2:
        c, length = shape
        return length, c
    if len(shape) == 1:
        return shape[0], 1
    raise ValueError(f"expected a sample shape with 1 to 3 dims, got {shape}")


def to_sequence(x: torch.Tensor) -> torch.Tensor:
    """Map a batch ``(B, *sample_shape)`` to ``(B, T, F)`` following `sequence_shape`."""
    if x.dim() == 4:  # (B, C, H, W) -> (B, H, C, W) -> (B, H, C*W): each row is one token
        b, c, h, w = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, h, c * w)
    if x.dim() == 3:  # (B, C, L) -> (B, L, C): channels are the features of each step
        return x.transpose(1, 2)
    if x.dim() == 2:  # (B, L) -> (B, L, 1)
        return x.unsqueeze(-1)
    raise ValueError(f"expected a batch with 2 to 4 dims, got shape {tuple(x.shape)}")
