"""Export of a pruned model: its full state dict gathered from any wrapper, and the physically
smaller model of structured pruning and its file.

`full_state_dict` and `plain_copy` gather the full weights of a model wrapped by DDP or sharded by
FSDP2 (DTensor parameters): both are collectives under FSDP2, so every rank must call them.

`shrink` removes the chosen channels of each group (`trainer.pruning.graph`) by replaying them on
Torch-Pruning's graph. Torch-Pruning does not update a model's own head count: `shrink` sets
`nn.MultiheadAttention`'s (heads are removed whole, so a forward that splits heads by their size,
as `trainer.models.attention` does, needs nothing), and `check_exact` compares the shrunk model's
outputs with the masked model's, naming the module where they differ. `save_pruned` writes the
shrunk model without pickling code (its state dict, the removed channels of each group and an
example input); `load_pruned` rebuilds it from a fresh dense model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.distributed.parallelize import unwrap
from trainer.pruning.graph import ChannelGroup, dependency_graph, group_masks, masked_copy

ARTIFACT_FORMAT = "hooktrain.pruned_model.v1"

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


def shrink(
    model: nn.Module, removed: Mapping[str, Sequence[int]], example: torch.Tensor
) -> nn.Module:
    """A smaller copy of a plain `model` without the `removed` channels of each group (replayed on
    Torch-Pruning's graph), with the head counts of its attention modules set to match."""
    small = copy.deepcopy(model)
    training = small.training
    heads = _head_counts(small)
    graph = dependency_graph(small, example)
    for module in heads:
        module.num_heads = 1  # Torch-Pruning asserts embed_dim % num_heads; set right below
    for root, channels in removed.items():
        if channels:
            module = small.get_submodule(root)
            handler = graph.get_pruner_of_module(module).prune_out_channels
            graph.get_pruning_group(module, handler, list(channels)).prune(record_history=False)
    _set_head_counts(heads)
    small.train(training)
    return small


def _head_counts(model: nn.Module) -> dict[nn.MultiheadAttention, int]:
    """{attention module: its head size} before shrinking."""
    return {m: m.head_dim for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _set_head_counts(heads: Mapping[nn.MultiheadAttention, int]) -> None:
    """Torch-Pruning leaves `num_heads` as it was and divides the kept width by it: whole heads
    were removed, so the head size stays and the count is the kept width over it. (A module's
    own head count elsewhere is not known here: `check_exact` refuses it, naming the module.)"""
    for module, head_dim in heads.items():
        module.head_dim = head_dim
        module.num_heads = module.embed_dim // head_dim


def check_exact(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    removed: Mapping[str, Sequence[int]],
    example: torch.Tensor,
) -> nn.Module:
    """The shrunk model, after checking that it computes the masked model's outputs on
    `example`; ValueError naming the module of the first group where it does not."""
    masks = group_masks(groups, removed, {n: p.shape for n, p in model.named_parameters()})
    small = shrink(model, removed, example)
    if _max_difference(masked_copy(model, masks), small, example) is None:
        return small
    for group in groups:  # find the culprit: one group at a time
        alone = {group.root: removed.get(group.root, [])}
        mask = group_masks([group], alone, {n: p.shape for n, p in model.named_parameters()})
        gap = _max_difference(masked_copy(model, mask), shrink(model, alone, example), example)
        if gap is not None:
            culprit = _culprit(model, group)
            raise ValueError(
                f"structured pruning: removing the channels of {culprit} (the group of "
                f"{group.root!r}: {', '.join(group.members)}) changes the model's outputs (max abs "
                f"difference {gap:.3g}): its forward depends on their count (e.g. a head count of "
                f"its own); add {group.root!r} to callbacks.pruning.exclude"
            )
    raise ValueError(
        "structured pruning: the shrunk model's outputs differ from the masked model's"
    )


def _culprit(model: nn.Module, group: ChannelGroup) -> str:
    """The group's attention module (its own head count is the usual cause), else its root."""
    for name in group.members:
        owner = name.rpartition(".")[0]
        for candidate in (name, owner):
            module = model.get_submodule(candidate)
            if isinstance(module, nn.MultiheadAttention) or hasattr(module, "num_heads"):
                return f"{type(module).__name__} {candidate!r}"
    return f"{type(model.get_submodule(group.root)).__name__} {group.root!r}"


@torch.no_grad()
def _max_difference(a: nn.Module, b: nn.Module, example: torch.Tensor) -> float | None:
    """None when `a` and `b` give the same outputs (to float rounding), else the max gap."""
    try:
        x, y = a.eval()(example), b.eval()(example)
    except Exception:  # a shape that no longer fits: the forward counted the channels
        return float("inf")
    if x.shape != y.shape:
        return float("inf")
    scale = max(1.0, float(x.abs().max()))
    gap = float((x - y).abs().max())
    return None if gap <= 1e-4 * scale else gap


# ----------------------------------------------------------------------------------- files


def save_pruned(
    path: str | os.PathLike,
    small: nn.Module,
    removed: Mapping[str, Sequence[int]],
    example: torch.Tensor,
) -> Path:
    """Write the shrunk model without pickling code: its state dict, the removed channels of each
    group (by root layer) and the example input its graph is traced with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": ARTIFACT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in small.state_dict().items()},
        "removed": {root: [int(c) for c in channels] for root, channels in removed.items()},
        "example": example[:1].detach().cpu(),
    }
    torch.save(data, path)
    return path


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The shrunk model saved by `save_pruned`, from `model`, a fresh dense model built from the
    same config: the removal replayed, then the state dict loaded (`weights_only=True`)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: not a pruned model file ({ARTIFACT_FORMAT})")
    small = shrink(model, data["removed"], data["example"])
    small.load_state_dict(data["state_dict"])
    return small


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
