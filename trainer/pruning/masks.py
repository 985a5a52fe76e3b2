"""Pure functions: which weights are pruned, unstructured masks, and the cubic sparsity schedule
(structured masks follow channel groups: `trainer.pruning.graph`).

The ranking math is PyTorch's own (`torch.nn.utils.prune`): `L1Unstructured.compute_mask` drops the
`k` smallest |w| of a tensor. Nothing here installs `torch.nn.utils.prune`'s forward-pre-hook reparametrization
(`weight_orig` * `weight_mask`): masks are plain boolean tensors (True = kept) that the caller holds
and multiplies into the weights, which keeps DDP's and FSDP2's parameters untouched.

Masks are exact: the number pruned is torch's `round(sparsity * count)` per layer (`scope="layer"`)
or over all selected weights together (`scope="global"`: one magnitude threshold for every layer);
structured pruning counts units of a channel group with the same rounding (`pruned_count`).
Given `previous` masks, only entries still alive are ranked and the new mask never revives a pruned
entry, so gradual pruning is monotone and the pruned count is still exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
METHODS = ("unstructured", "structured")
SCOPES = ("global", "layer")


# ----------------------------------------------------------------------------------- selection


def prunable_layers(
    model: nn.Module, exclude: Sequence[str] = (), structured: bool = False
) -> list[tuple[str, nn.Module]]:
    """(module name, module) of the Linear and Conv layers whose weights are pruned.

    `exclude` holds regexes searched in module names (`"classifier\\.4"`, `"^net\\.4$"`). With
    `structured=True` the last such layer (the output layer of the reference models) is always
    left out: removing its rows would remove classes.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if structured:
        layers = layers[:-1]
    patterns = [re.compile(p) for p in exclude]
    return [(n, m) for n, m in layers if not any(p.search(n) for p in patterns)]


def pruned_count(sparsity: float, total: int) -> int:
    """How many of `total` entries a `sparsity` prunes: torch.nn.utils.prune's own rounding."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return prune._compute_nparams_toprune(float(sparsity), total)


# ----------------------------------------------------------------------------------- masks


def unstructured_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    scope: str = "global",
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """L1 magnitude masks (bool, True = kept) reaching `sparsity` exactly.

    `scope="layer"` prunes `round(sparsity * numel)` of every tensor; `scope="global"` prunes
    `round(sparsity * total)` of all of them ranked together by |w|. Every kept |w| is >= every
    pruned |w| (within a layer, or across layers for global).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    previous = previous or {}
    alive = {
        name: previous[name].to(w.device).flatten().bool()
        if name in previous
        else torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        for name, w in weights.items()
    }
    groups = [[name] for name in weights] if scope == "layer" else [list(weights)]
    masks: dict[str, torch.Tensor] = {}
    for names in groups:
        total = sum(weights[n].numel() for n in names)
        already = sum(int((~alive[n]).sum()) for n in names)
        extra = max(pruned_count(sparsity, total) - already, 0)
        # Rank only the entries still alive: torch's L1Unstructured on their concatenation.
        scores = torch.cat([weights[n].detach().flatten()[alive[n]].float() for n in names])
        keep = prune.L1Unstructured(amount=extra).compute_mask(scores, torch.ones_like(scores))
        offset = 0
        for n in names:
            mask = alive[n].clone()
            count = int(mask.sum())
            mask[mask.clone()] = keep[offset : offset + count].bool()
            offset += count
            masks[n] = mask.view_as(weights[n])
    return masks


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of entries pruned over all `masks` together."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


# ----------------------------------------------------------------------------------- schedule


def cubic_sparsity(
    step: int,
    *,
    final: float,
    initial: float = 0.0,
    start: int = 0,
    every: int = 1,
    num_prunes: int = 1,
) -> float:
    """Zhu & Gupta (2017) gradual pruning: the target sparsity after `step` optimizer steps.

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * Δt)) ** 3,   t in {t0, t0 + Δt, ..., t0 + nΔt}

    with t0 = `start`, Δt = `every`, n = `num_prunes`, s_i = `initial`, s_f = `final`. The value is
    held constant between pruning steps and after t0 + nΔt; before t0 nothing is pruned (0.0).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if step < start:
        return 0.0
    if num_prunes <= 0:
        return final
    k = min((step - start) // every, num_prunes)
    if k == 0:
        return initial  # exactly s_i and s_f at the ends, no rounding error
    if k == num_prunes:
        return final
    return final + (initial - final) * (1.0 - k / num_prunes) ** 3


def pruning_steps(start: int, every: int, num_prunes: int) -> list[int]:
    """The steps t0, t0 + Δt, ..., t0 + nΔt at which the cubic schedule changes."""
    return [start + k * every for k in range(max(num_prunes, 0) + 1)]
