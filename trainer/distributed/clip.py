"""Gradient-norm clipping that also works when only some parameters are DTensors.

`torch.nn.utils.clip_grad_norm_` refuses a mix of DTensor and plain gradients (tensor parallel
shards some layers and replicates the rest) and DTensors on different meshes (fsdp_tp). Here the
norm is taken per group of like gradients, made a plain number with `full_tensor()` (the
collective that sums the shards), and combined.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients in place so that their global L2 norm is at most `max_norm`; return the
    norm before clipping (a plain tensor)."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    squares = []
    for group in groups.values():
        square = sum(n.float() ** 2 for n in torch._foreach_norm(group))
        squares.append(square.full_tensor() if isinstance(square, DTensor) else square)
    total = torch.stack(squares).sum().sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with implicit_replication():  # let the plain `scale` multiply DTensor gradients
        for group in groups.values():
            torch._foreach_mul_(group, scale)
    return total
