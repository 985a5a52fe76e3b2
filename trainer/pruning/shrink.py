"""Export of a pruned model: its full state dict, gathered from any wrapper. (The physically
smaller copy of a structurally pruned model is `trainer.pruning.graph.shrink`.)

`full_state_dict` and `plain_copy` gather the full weights of a model wrapped by DDP or sharded by
FSDP2 (DTensor parameters): both are collectives under FSDP2, so every rank must call them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.distributed.parallelize import unwrap

# ----------------------------------------------------------------------------------- gathering


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict with full (gathered) CPU tensors. A collective under FSDP2."""
    return {
        name: _full(value).detach().to("cpu", copy=True)
        for name, value in unwrap(model).state_dict().items()
    }


def plain_copy(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A plain CPU copy of the user's module with full weights: no DDP wrapper, no FSDP2 sharding
    or hooks. Under FSDP2 (which refuses `copy.deepcopy`) the copy is a twin of the module tree
    filled from `state` (a `full_state_dict`; gathered here if not given, a collective)."""
    module = unwrap(model)
    if not any(isinstance(t, DTensor) for t in module.state_dict().values()):
        return copy.deepcopy(module).cpu()
    return _twin(module, full_state_dict(model) if state is None else state, "")


# Attributes that FSDP2 (`fully_shard`, composable API state) adds to the modules it manages.
_WRAPPER_STATE = ("__composable_api_state_key", "_is_fsdp_managed_module", "_fsdp_")


def _twin(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """A new instance of the module's own class (FSDP2's `FSDP<Name>` subclass dropped) with fresh
    hook tables, the same plain attributes, parameters and buffers from `state`, twin children."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    twin = cls.__new__(cls)
    nn.Module.__init__(twin)
    internal = set(twin.__dict__) - {"training"}
    for key, value in module.__dict__.items():
        if key not in internal and not key.startswith(_WRAPPER_STATE):
            twin.__dict__[key] = value
    for name, param in module._parameters.items():
        twin._parameters[name] = (
            None
            if param is None
            else nn.Parameter(state[prefix + name].clone(), param.requires_grad)
        )
    for name, buffer in module._buffers.items():
        if buffer is None:
            twin._buffers[name] = None
        else:
            full = state.get(prefix + name)  # non-persistent buffers are not in the state dict
            twin._buffers[name] = _full(buffer).detach().cpu().clone() if full is None else full
    for name, child in module._modules.items():
        twin._modules[name] = None if child is None else _twin(child, state, f"{prefix}{name}.")
    return twin


# ----------------------------------------------------------------------------------- export


def export(model: nn.Module, path: str | os.PathLike, write: bool = True) -> Path:
    """Write the pruned model's full state dict (the zeros are plain zeros: permanent) with
    `torch.save`; reload it with `torch.load(path, weights_only=True)`. A collective under FSDP2:
    call it on every rank, with `write=True` on one (rank 0)."""
    state = full_state_dict(model)
    path = Path(path)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return path


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
