"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"): drop a residual
branch for a whole sample.

`DropPath` sits on each residual branch of a transformer block, ``x + drop_path(branch(x))``. In
training it keeps each sample's branch output with probability ``1 - p`` and scales the kept ones
by ``1 / (1 - p)``, so the expected output is the branch output; in eval, and at ``p = 0``, it is
the identity. Each call draws a fresh mask (a block's attention and MLP branches are dropped
independently, as in timm and Liu et al. 2023).

The mask is drawn from the global generator, shape ``(B, 1, ..., 1)`` with B the local batch.
Tensor-parallel ranks of one group read the same batch with the same seed and make the same
draws, so they drop the same samples; the branch output it multiplies is the full (replicated)
tensor after the rowwise projection, never a shard.

Per-block rates: a model with drop-path rate ``r`` and ``depth`` blocks gives block ``i`` the rate
``r * depth_scale(i)``: ``constant`` 1 for every block, ``linear`` ``i / (depth - 1)``, rising from
0 at the first block to ``r`` at the last (Huang et al.'s linear decay rule; timm's
``torch.linspace(0, r, depth)``). Each `DropPath` keeps its ``depth_scale``, so a schedule
(`trainer.callbacks.stochastic_depth`) sets every block from the one model rate.
"""

from __future__ import annotations

import torch
from torch import nn

RULES = ("constant", "linear")


def depth_scales(depth: int, rule: str) -> list[float]:
    """Each block's share of the model's drop-path rate under `rule` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"drop_path_rule must be one of {', '.join(RULES)}; got {rule!r}")
    if rule == "constant":
        return [1.0] * depth
    # linspace(0, 1, depth); a single block gets 0, as torch.linspace(0, r, 1) gives
    return [i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def check_rate(name: str, rate: object) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be a drop-path rate in [0, 1), got {rate!r}")
    return float(rate)


class DropPath(nn.Module):
    """Drop the whole input of a sample with probability ``p`` in training; see the module
    docstring.

    Attributes:
        p: float, the drop probability (a plain attribute: a schedule changes it between steps).
        depth_scale: float, this block's share of the model's rate (``p = rate * depth_scale``).
    """

    def __init__(self, p: float = 0.0, depth_scale: float = 1.0) -> None:
        super().__init__()
        self.p = check_rate("drop_path", p)
        self.depth_scale = float(depth_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, depth_scale={self.depth_scale}"
