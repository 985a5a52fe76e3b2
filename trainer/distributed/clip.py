"""The global gradient norm, and clipping by it, also when only some parameters are DTensors.

`torch.nn.utils.clip_grad_norm_` refuses a mix of DTensor and plain gradients (tensor parallel
shards some layers and replicates the rest) and DTensors on different meshes (fsdp_tp). Here the
norm is taken per group of like gradients, made a plain number with `full_tensor()` (the
collective that sums the shards), and combined. Under DDP, FSDP2 and TP the result is the same on
every rank, so a decision taken on it (skip a non-finite step) is agreed without another collective.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication


def has_dtensors(module: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2, tensor parallel): only then do the functions
    below differ from torch's own."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def _grad_groups(parameters: Iterable[nn.Parameter]) -> list[list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            g = p.grad
            groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    return list(groups.values())


def grad_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients together, as a plain 0-dim tensor (no host sync)."""
    groups = _grad_groups(parameters)
    if all(not isinstance(group[0], DTensor) for group in groups):
        return nn.utils.get_total_norm([g for group in groups for g in group])
    squares = []
    for group in groups:
        square = sum(n.float() ** 2 for n in torch._foreach_norm(group))
        squares.append(square.full_tensor() if isinstance(square, DTensor) else square)
    if not squares:
        return torch.zeros(())
    return torch.stack(squares).sum().sqrt()


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients in place so that their global L2 norm is at most `max_norm`; return the
    norm before clipping."""
    parameters = list(parameters)
    if not any(isinstance(p.grad, DTensor) for p in parameters):
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    total = grad_norm(parameters)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with implicit_replication():  # let the plain `scale` multiply DTensor gradients
        for group in _grad_groups(parameters):
            torch._foreach_mul_(group, scale)
    return total
