"""Structured pruning of any model through Torch-Pruning's dependency graph (DepGraph).

Channels that must go together form a group: a layer's output channel, the BatchNorm entries
after it, every layer that writes the same channel of a residual sum, the input columns of every
layer that reads it; an attention head's q/k/v rows and the output projection's columns. Torch-
Pruning finds the groups by tracing one forward (`channel_groups`). Each group is turned here into
plain data, a `ChannelGroup`: for every parameter entry the group would remove, which of the
group's units (a channel; a whole head in attention) it belongs to. From that, masks and ranking
are tensor indexing on the weights alone, the same on every rank (`choose`, `group_masks`), and
the physical shrink replays the chosen channels on Torch-Pruning's graph
(`trainer.pruning.shrink.shrink`).

Masking every entry a removal would remove (the writers' rows and the readers' columns) makes the
masked model compute exactly what the shrunk one computes, whatever elementwise ops lie between.
What cannot work that way is refused or skipped, never shrunk wrongly:

- a group through a normalization over the channels (LayerNorm, GroupNorm, RMSNorm: removing a
  channel changes the statistics of the others) is left unpruned (`skipped`);
- a layer Torch-Pruning cannot shrink (grouped convolutions, LSTM, an unknown module with
  parameters) raises ValueError naming it;
- a forward that depends on the channel count (a head count of its own) is found by
  `trainer.pruning.shrink.check_exact`, which names the module.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from trainer.pruning.masks import pruned_count

# Normalizations whose statistics mix the channels they see: a group through one is not pruned.
CHANNEL_MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@functools.cache
def torch_pruning() -> ModuleType:
    """The `torch_pruning` package, or ValueError saying how to install it."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ValueError(
            "structured pruning needs torch-pruning: pip install 'hooktrain[prune]'"
        ) from None
    return tp


@dataclass
class Slice:
    """Entries of one parameter a group removes: `positions` along `dim`, each in `units[j]`."""

    param: str
    dim: int
    positions: torch.Tensor
    units: torch.Tensor


@dataclass
class ChannelGroup:
    """One coupled group. `root`: the layer whose output channels index it (`channels` of them);
    `unit_of_channel[c]`: the unit (a channel, or a whole head) channel c is pruned with."""

    root: str
    channels: int
    unit_of_channel: torch.Tensor
    slices: list[Slice]
    members: list[str]

    @property
    def units(self) -> int:
        return int(self.unit_of_channel.max()) + 1


# ----------------------------------------------------------------------------------- groups


def dependency_graph(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning's graph of `model` (traced with one forward of `example`; autograd on)."""
    tp = torch_pruning()
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example, verbose=False)


def channel_groups(
    model: nn.Module, example: torch.Tensor, ignored: Sequence[str] = ()
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The prunable groups of a plain `model`, and {root: why} of the groups left unpruned.
    `ignored`: layers whose output channels are never pruned (a group holding one is dropped)."""
    model = copy.deepcopy(model)  # tracing switches it to eval mode
    graph = dependency_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    roots = (nn.Linear, _ConvNd, nn.MultiheadAttention)
    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = {}
    layers = [model.get_submodule(n) for n in ignored]
    for group in graph.get_all_groups(ignored_layers=layers, root_module_types=roots):
        root = names[group[0].dep.target.module]
        items = [
            (names[it.dep.target.module], it.dep.target.module, it.dep, it.idxs, it.root_idxs)
            for it in group.items
            if it.dep.target.module in names
        ]
        norm = next((n for n, m, *_ in items if isinstance(m, CHANNEL_MIXING_NORMS)), None)
        if norm is not None:
            skipped[root] = (
                f"{type(model.get_submodule(norm)).__name__} {norm!r} normalizes over them"
            )
            continue
        channels = len(group[0].idxs)
        units = _units(model, graph, items, channels)
        slices: list[Slice] = []
        for name, module, dep, idxs, root_idxs in items:
            out = graph.is_out_channel_pruning_fn(dep.handler)
            node = graph.module2node[module]
            for param, dim, positions, which in _entries(name, module, out, idxs, node.pruning_dim):
                slices.append(Slice(param, dim, positions, units[torch.tensor(root_idxs)][which]))
        members = list(dict.fromkeys(n for n, *_ in items))
        groups.append(ChannelGroup(root, channels, units, _merged(slices), members))
    return groups, skipped


def _entries(name: str, module, out: bool, idxs: Sequence[int], pruning_dim: int):
    """(parameter, dim, positions, which of `idxs` each position is) that pruning `idxs` of
    `module` removes, for the module types Torch-Pruning shrinks exactly; ValueError otherwise."""
    t = torch.tensor(list(idxs), dtype=torch.long)
    every = torch.arange(len(t))
    if isinstance(module, nn.Parameter):  # a parameter outside any known layer
        return [(name, pruning_dim, t, every)]
    own = [k for k, p in module.named_parameters(recurse=False) if p is not None]
    bias = [(f"{name}.bias", 0, t, every)] if getattr(module, "bias", None) is not None else []
    if isinstance(module, nn.Linear):
        return (
            [(f"{name}.weight", 0, t, every), *bias] if out else [(f"{name}.weight", 1, t, every)]
        )
    if isinstance(module, _ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups != 1 and not depthwise:
            raise ValueError(f"{name!r}: grouped {type(module).__name__} cannot be pruned")
        if depthwise or out:
            return [(f"{name}.weight", int(module.transposed), t, every), *bias]
        return [(f"{name}.weight", 1 - int(module.transposed), t, every)]
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        return [(f"{name}.{k}", 0, t, every) for k in own]
    if isinstance(module, nn.PReLU):  # one slope per channel, or one shared slope
        return [(f"{name}.weight", 0, t, every)] if module.num_parameters > 1 else []
    if isinstance(module, nn.Embedding):
        return [(f"{name}.weight", 1, t, every)]
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None:
            raise ValueError(
                f"{name!r}: MultiheadAttention with kdim/vdim or add_bias_kv cannot be pruned"
            )
        e = module.embed_dim
        rows, thrice = torch.cat([t, t + e, t + 2 * e]), every.repeat(3)
        out_bias = module.out_proj.bias is not None
        return [
            (f"{name}.in_proj_weight", 0, rows, thrice),
            (f"{name}.in_proj_weight", 1, t, every),
            *(
                [(f"{name}.in_proj_bias", 0, rows, thrice)]
                if module.in_proj_bias is not None
                else []
            ),
            (f"{name}.out_proj.weight", 0, t, every),
            (f"{name}.out_proj.weight", 1, t, every),
            *([(f"{name}.out_proj.bias", 0, t, every)] if out_bias else []),
        ]
    if own or list(module.parameters()):
        raise ValueError(f"{type(module).__name__} {name!r} cannot be pruned structurally")
    return []  # Torch-Pruning's placeholders for elementwise ops, reshapes, concatenations


def _merged(slices: list[Slice]) -> list[Slice]:
    """One slice per (parameter, dim), each position once."""
    merged: dict[tuple[str, int], Slice] = {}
    for s in slices:
        key = (s.param, s.dim)
        if key in merged:
            old = merged[key]
            s = Slice(
                s.param,
                s.dim,
                torch.cat([old.positions, s.positions]),
                torch.cat([old.units, s.units]),
            )
        merged[key] = s
    out = []
    for s in merged.values():
        positions, first = _first_occurrences(s.positions)
        out.append(Slice(s.param, s.dim, positions, s.units[first]))
    return out


def _first_occurrences(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(unique),), len(values), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), reduce="amin")
    return unique, first


def _units(model: nn.Module, graph, items, channels: int) -> torch.Tensor:
    """unit_of_channel: channels of one attention head share a unit (heads are removed whole,
    so that the head size, which the forward reshapes by, stays); other channels are their own."""
    parent = list(range(channels))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    outputs = [item for item in items if graph.is_out_channel_pruning_fn(item[2].handler)]
    linears = {name for name, module, *_ in outputs if isinstance(module, nn.Linear)}
    for name, module, _, idxs, root_idxs in outputs:
        size = _head_size(model, name, module, linears)
        if size is None:
            continue
        first_of_head: dict[int, int] = {}
        for idx, root in zip(idxs, root_idxs, strict=True):
            head = idx // size
            if head in first_of_head:
                parent[find(root)] = find(first_of_head[head])
            else:
                first_of_head[head] = root
    roots = [find(c) for c in range(channels)]
    ids = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return torch.tensor([ids[r] for r in roots], dtype=torch.long)


def _head_size(model: nn.Module, name: str, module, linears: set[str]) -> int | None:
    """Channels per head of an attention item: an `nn.MultiheadAttention`, or a Linear that is
    one of several q/k/v projections (`linears`: the group's Linear outputs) of a module with
    `head_dim` or `num_heads`."""
    if isinstance(module, nn.MultiheadAttention):
        return module.head_dim
    if not isinstance(module, nn.Linear):
        return None
    owner_name = name.rpartition(".")[0]
    owner = model.get_submodule(owner_name)
    # q, k and v: the owner's Linears whose output channels attention couples in this group
    siblings = {n for n in linears if n.rpartition(".")[0] == owner_name}
    if len(siblings) < 2:
        return None
    head_dim, heads = getattr(owner, "head_dim", None), getattr(owner, "num_heads", None)
    if isinstance(head_dim, int):
        return head_dim
    if isinstance(heads, int) and module.out_features % heads == 0:
        return module.out_features // heads
    return None


# ----------------------------------------------------------------------------------- masks


def unit_norms(group: ChannelGroup, weights: Mapping[str, torch.Tensor], p: float) -> torch.Tensor:
    """The Lp norm of each unit over every entry the group would remove with it."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for s in group.slices:
        w = weights[s.param].detach().cpu().double().index_select(s.dim, s.positions)
        per_position = w.movedim(s.dim, 0).reshape(len(s.positions), -1).abs().pow(p).sum(1)
        total.index_add_(0, s.units, per_position)
    return total.pow(1.0 / p)


def choose(
    groups: Sequence[ChannelGroup],
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    norm: float = 2,
    previous: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """{group root: its removed channels}: torch's `round(sparsity * units)` units of each group,
    those of smallest group norm; channels removed before stay removed (gradual pruning)."""
    previous = previous or {}
    removed = {}
    for group in groups:
        dead = torch.zeros(group.units, dtype=torch.bool)
        dead[group.unit_of_channel[list(previous.get(group.root, []))]] = True
        extra = pruned_count(sparsity, group.units) - int(dead.sum())
        if extra > 0:
            norms = unit_norms(group, weights, norm).masked_fill(dead, float("inf"))
            dead[torch.topk(norms, extra, largest=False).indices] = True
        removed[group.root] = dead[group.unit_of_channel].nonzero().flatten().tolist()
    return removed


def group_masks(
    groups: Sequence[ChannelGroup],
    removed: Mapping[str, Sequence[int]],
    shapes: Mapping[str, torch.Size],
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = kept) of every parameter the groups touch, zero where `removed`."""
    masks = {
        s.param: torch.ones(shapes[s.param], dtype=torch.bool) for g in groups for s in g.slices
    }
    for group in groups:
        dead_units = torch.zeros(group.units, dtype=torch.bool)
        dead_units[group.unit_of_channel[list(removed.get(group.root, []))]] = True
        for s in group.slices:
            gone = s.positions[dead_units[s.units]]
            masks[s.param].index_fill_(s.dim, gone, False)
    return masks


@torch.no_grad()
def masked_copy(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return model
