"""Export of a pruned model: its full state dict, and a physically smaller copy for structured pruning.

`shrink(model)` removes the hidden units / channels whose weights and bias are all zero, together
with the matching input columns of the next layer, so that a structurally pruned model really runs
fewer multiply-adds. It follows chains of layers the way the reference `MLP` (`net`) and `CNN`
(`features` then `classifier`) run them: Linear/Conv layers separated by modules that map zero to
zero (ReLU, pooling, dropout, flatten), each layer optionally followed by its BatchNorm, whose
entries go with the layer's units. The output layer keeps all its outputs.

`full_state_dict` and `plain_copy` gather the full weights of a model wrapped by DDP or sharded by
FSDP2 (DTensor parameters): both are collectives under FSDP2, so every rank must call them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.compress.batchnorm import batchnorm_pairs
from trainer.distributed.parallelize import unwrap
from trainer.pruning.masks import PRUNABLE

# Modules that map an all-zero channel to an all-zero channel (so a dead unit can be removed).
ZERO_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Hardtanh,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


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


# ----------------------------------------------------------------------------------- shrinking


def _chain(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, leaf) in the order the reference models run them: children in order,
    Sequentials expanded."""
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            yield from _chain(child, f"{prefix}{name}.")
        elif len(list(child.children())) == 0:
            yield prefix + name, child
        else:
            raise ValueError(
                f"shrink: cannot follow {type(child).__name__} {name!r}; shrink supports chains "
                "of Sequentials of layers (the reference MLP and CNN)"
            )


def _smaller(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        if layer.groups != 1:
            raise ValueError("shrink: grouped convolutions are not supported")
        new = type(layer)(
            weight.shape[1],
            weight.shape[0],
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias is not None,
            padding_mode=layer.padding_mode,
        )
    new = new.to(dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(layer.training)
    return new


def _smaller_norm(norm: _BatchNorm, rows: torch.Tensor) -> _BatchNorm:
    """The BatchNorm of the kept `rows`: their weight, bias and running statistics."""
    new = type(norm)(
        rows.numel(),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    state = {k: v[rows] if v.dim() == 1 else v for k, v in norm.state_dict().items()}
    new.load_state_dict(state, assign=True)  # num_batches_tracked (0-dim) as it is
    new.train(norm.training)
    return new


def shrink(model: nn.Module) -> nn.Module:
    """A smaller copy of a plain (unwrapped, unsharded) `model` without its dead units.

    A unit (Linear row, Conv output channel) is dead when its weights and its bias are all zero:
    its activation is then zero everywhere, so it and the next layer's columns that read it can be
    removed without changing any output. When a BatchNorm reads the layer's output
    (`batchnorm_pairs`), the unit is dead when that BatchNorm's weight and bias for it are zero
    (its output after the BatchNorm is zero whatever came in; a BatchNorm without them,
    `affine=False`, keeps every unit), and the BatchNorm's entries go with it. Structured
    pruning (its biases and BatchNorm entries masked) makes exactly such units; the result
    computes the same function with fewer parameters.
    """
    model = copy.deepcopy(model)
    chain = list(_chain(model))
    weighted = [i for i, (_, m) in enumerate(chain) if isinstance(m, PRUNABLE)]
    if not weighted:
        return model
    norms = batchnorm_pairs(model)  # layer name -> the BatchNorm that reads its output
    keep: torch.Tensor | None = None  # kept channels of the current activation (None: all)
    channels = 0  # channel count of the current activation before shrinking
    flattened = False  # the current activation was flattened from (channels, *spatial)
    for i, (name, layer) in enumerate(chain):
        if isinstance(layer, PRUNABLE):
            weight = layer.weight.detach()
            bias = None if layer.bias is None else layer.bias.detach()
            if keep is not None:
                cols = keep
                if flattened:  # Flatten laid out channel c as columns c*per ... (c+1)*per - 1
                    per = weight.shape[1] // channels
                    cols = (keep[:, None] * per + torch.arange(per, device=keep.device)).flatten()
                weight = weight.index_select(1, cols)
            channels = weight.shape[0]
            norm = model.get_submodule(norms[name]) if name in norms else None
            if i == weighted[-1]:
                rows = torch.arange(channels, device=weight.device)
            else:
                if norm is None:
                    dead = (weight.flatten(1) == 0).all(dim=1)
                    if bias is not None:
                        dead &= bias == 0
                elif norm.affine:
                    dead = (norm.weight == 0) & (norm.bias == 0)
                else:
                    dead = torch.zeros(channels, dtype=torch.bool, device=weight.device)
                rows = (~dead).nonzero().flatten()
                if rows.numel() == 0:  # a fully dead layer: keep one (dead) unit for valid shapes
                    rows = torch.zeros(1, dtype=torch.long, device=weight.device)
            model.set_submodule(
                name,
                _smaller(layer, weight.index_select(0, rows), None if bias is None else bias[rows]),
            )
            if norm is not None:
                model.set_submodule(norms[name], _smaller_norm(norm, rows))
            keep, flattened = rows, False
        elif name in norms.values():
            continue  # shrunk with its layer, above
        elif isinstance(layer, nn.Flatten):
            if (layer.start_dim, layer.end_dim) != (1, -1):
                raise ValueError("shrink: only Flatten(start_dim=1, end_dim=-1) is supported")
            flattened = keep is not None
        elif not isinstance(layer, ZERO_PRESERVING):
            raise ValueError(
                f"shrink: {type(layer).__name__} ({name!r}) may turn a zero channel into a nonzero "
                "one, so dead units before it cannot be removed"
            )
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
