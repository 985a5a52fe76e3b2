"""Low-rank factorization of trained Linear and Conv layers from the truncated SVD of their weights.

A layer with weight W of shape (m, n) (a Conv's (out, in, *kernel) read as (out, in * kernel):
one row per output channel, one column per input value under the kernel), W = U S Vh, becomes

    first  = sqrt(S_r) Vh_r  (r x n): Linear(n, r, bias=False), or the same Conv (kernel, stride,
                                      padding, dilation, padding mode) with r output channels
    second = U_r sqrt(S_r)   (m x r): Linear(r, m), or a 1x1 Conv(r, m), with the layer's bias

which is the best rank-r approximation of W (Eckart-Young) built from the trained weights, not a
fresh initialization. sqrt(S) is split between the factors so both start on the same scale for
fine-tuning. Both factors run on the layer's own output positions, so parameters and FLOPs both go
from m*n to r*(m + n) (bias aside): a layer is factorized only where r*(m + n) < m*n and is
otherwise left alone, with the reason in the report.

`factorize` replaces layers in place under their own names (`fc1` becomes `Sequential(first,
second)`: state-dict keys `fc1.0.weight`, `fc1.1.weight`, `fc1.1.bias`). Its report carries the
`plan` ({name: rank}) from which `apply_plan` rebuilds the same structure on a fresh model, so a
resumed run can load a checkpoint of the factorized model.

The SVD is `torch.linalg.svd` for every size: rank by energy needs the whole spectrum anyway, and
on CPU (torch 2.13, 2 busy cores) `torch.svd_lowrank` at half rank was not faster from 1024 x 1024
up (2.3 s vs 3.3 s; 18.4 s vs 17.2 s at 2048 x 2048) while leaving a 1-2% larger residual. The
reference models' largest layer (256 x 784) takes 0.25 s.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
FACTORIZABLE = (nn.Linear, *CONVS)


# ----------------------------------------------------------------------------------- ranks


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _check_method(energy: float | None, ratio: float | None) -> None:
    if (energy is None) == (ratio is None):
        raise ValueError(
            f"give exactly one of energy or ratio, got energy={energy!r}, ratio={ratio!r}"
        )
    if energy is not None:
        _check_fraction("energy", energy)
    else:
        _check_fraction("ratio", ratio)


def kept_energy(singular_values: torch.Tensor) -> torch.Tensor:
    """kept[r - 1] = sum(s[:r]^2) / sum(s^2), in float64 (a zero weight keeps everything)."""
    power = singular_values.detach().double().square()
    total = power.sum()
    if total == 0:
        return torch.ones_like(power)
    return power.cumsum(0) / total


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r with sum(s[:r]^2) / sum(s^2) >= energy."""
    _check_fraction("energy", energy)
    kept = kept_energy(singular_values)
    r = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype))) + 1
    # Rounding can leave kept[-1] a hair under 1.0, so energy=1 would find no rank: use them all.
    return min(r, kept.numel())


def rank_for_ratio(full_rank: int, ratio: float) -> int:
    """ceil(ratio * full_rank), at least 1."""
    _check_fraction("ratio", ratio)
    # In binary floating point 0.07 * 100 is 7.000000000000001: without the nudge its ceiling
    # would be 8, not the 7 the user meant.
    return max(1, math.ceil(ratio * full_rank - 1e-9))


# ----------------------------------------------------------------------------------- factors


def _shape(layer: nn.Module) -> tuple[int, int]:
    """(m, n) of the layer's weight read as a matrix."""
    return layer.weight.shape[0], layer.weight[0].numel()


def factor_pair(layer: nn.Module, rank: int) -> nn.Sequential:
    """The two-layer structure replacing `layer` at `rank`, on its device and dtype, in its
    train/eval mode; the weights are fresh (see `fill_factors`)."""
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False, **kw)
        second = nn.Linear(rank, layer.out_features, bias=bias, **kw)
    else:
        # The base class, not type(layer): a user's subclass may take other constructor arguments.
        conv = next(c for c in CONVS if isinstance(layer, c))
        first = conv(
            layer.in_channels,
            rank,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=False,
            padding_mode=layer.padding_mode,
            **kw,
        )
        second = conv(rank, layer.out_channels, 1, bias=bias, **kw)
    pair = nn.Sequential(first, second)
    pair.train(layer.training)
    pair.requires_grad_(layer.weight.requires_grad)  # a frozen layer stays frozen
    return pair


def svd(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of the layer's weight matrix; computed in float32 at least (no half SVD on CPU)."""
    w = layer.weight.detach().flatten(1)
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    return torch.linalg.svd(w, full_matrices=False)


@torch.no_grad()
def fill_factors(
    pair: nn.Sequential, layer: nn.Module, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
) -> None:
    """Set `pair`'s weights to the truncated SVD of `layer`'s (`u`, `s`, `vh` from `svd`)."""
    first, second = pair
    rank = first.weight.shape[0]
    root = s[:rank].sqrt()
    first.weight.copy_((root[:, None] * vh[:rank]).reshape(first.weight.shape))
    second.weight.copy_((u[:, :rank] * root).reshape(second.weight.shape))
    if layer.bias is not None:
        second.bias.copy_(layer.bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ----------------------------------------------------------------------------------- counting


def _eval_forward(model: nn.Module, example: torch.Tensor) -> None:
    """One forward in eval mode without grad (batch norm statistics untouched), then every
    module's own train/eval mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for m, training in modes:
            m.training = training


def flops_per_sample(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of `model(example)` counted by `FlopCounterMode`, per sample of the batch."""
    with FlopCounterMode(display=False) as counter:
        _eval_forward(model, example)
    return counter.get_total_flops() // example.shape[0]


def _positions_and_flops(
    model: nn.Module, layers: Mapping[str, nn.Module], example: torch.Tensor
) -> tuple[dict[str, int], int]:
    """Output positions per sample of each layer (1 for a Linear on flat inputs, T for tokens,
    H*W for a Conv2d), and the model's FLOPs per sample, from one forward of `example`."""
    counts = dict.fromkeys(layers, 0)

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            counts[name] += output.numel() // module.weight.shape[0]  # summed if called twice

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    try:
        flops = flops_per_sample(model, example)
    finally:
        for h in handles:
            h.remove()
    return {n: c // example.shape[0] for n, c in counts.items()}, flops


def _costs(layer: nn.Module, rank: int | None, positions: int) -> dict[str, dict[str, int]]:
    """Parameters and FLOPs (2 per multiply-add, as FlopCounterMode counts; bias adds not
    counted) per sample, before and after factorizing at `rank` (None: left alone)."""
    m, n = _shape(layer)
    bias = 0 if layer.bias is None else layer.bias.numel()
    after = m * n if rank is None else rank * (m + n)
    return {
        "params": {"before": m * n + bias, "after": after + bias},
        "flops": {"before": 2 * m * n * positions, "after": 2 * after * positions},
    }


# ----------------------------------------------------------------------------------- selection


def _check_plain(model: nn.Module) -> None:
    # Replacing layers inside DDP leaves its gradient buckets on the old parameters, and an FSDP2
    # shard is not the whole weight: both would be silently wrong.
    if isinstance(model, DistributedDataParallel) or any(
        isinstance(p, DTensor) for p in model.parameters()
    ):
        raise ValueError(
            f"low-rank: {type(model).__name__} is wrapped or sharded; pass the plain module with "
            "full weights (unwrap DDP; gather FSDP2 with trainer.pruning.shrink.plain_copy)"
        )


def _left_alone(model: nn.Module, exclude: Sequence[str]) -> dict[str, str]:
    """Why each Linear/Conv layer that must not be replaced is left alone, by name."""
    patterns = [re.compile(p) for p in exclude]
    # Replacing a module that also lives under another name, or whose weight another module
    # uses (tied embeddings), would silently untie them.
    users: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(name.rpartition(".")[0])
    # nn.MultiheadAttention reads out_proj.weight itself, never calling out_proj.
    inside_mha = {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }
    reasons = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, FACTORIZABLE):
            continue
        hit = next((p.pattern for p in patterns if p.search(name)), None)
        others = [u for u in users[id(layer.weight)] if u != name]
        if name == "":
            reasons[name] = "it is the model itself: factorize the module that holds it"
        elif hit is not None:
            reasons[name] = f"excluded by {hit!r}"
        elif isinstance(layer, CONVS) and layer.groups != 1:
            reasons[name] = f"grouped convolution (groups={layer.groups})"
        elif name in inside_mha:
            reasons[name] = "nn.MultiheadAttention reads its weight directly"
        elif others:
            reasons[name] = f"its weight is shared with {', '.join(others)}"
    return reasons


def _nothing_to_factorize(model: nn.Module, reasons: Mapping[str, str]) -> None:
    why = "; ".join(f"{n or type(model).__name__}: {r}" for n, r in reasons.items())
    raise ValueError(
        f"{type(model).__name__}: nothing to factorize: "
        + (why or "it has no Linear, Conv1d, Conv2d or Conv3d layer")
    )


def check_factorizable(
    model: nn.Module, *, ratio: float | None = None, exclude: Sequence[str] = ()
) -> None:
    """Raise `factorize`'s ValueError where no layer could be factorized, judged from the module
    tree alone (before training): no eligible layer, or (`ratio`, whose ranks the shapes fix) none
    whose factors would pay. By energy the ranks wait for the trained spectrum; a layer where
    even rank 1 does not pay (m + n >= m * n) is never factorized."""
    reasons = _left_alone(model, exclude)
    for name, layer in model.named_modules():
        if not isinstance(layer, FACTORIZABLE) or name in reasons:
            continue
        m, n = _shape(layer)
        rank = 1 if ratio is None else rank_for_ratio(min(m, n), ratio)
        if rank * (m + n) < m * n:
            return
        reasons[name] = f"rank {rank} does not pay: r*(m+n) = {rank * (m + n)} >= m*n = {m * n}"
    _nothing_to_factorize(model, reasons)


# ----------------------------------------------------------------------------------- entry points


def factorize(
    model: nn.Module,
    *,
    example: torch.Tensor,
    energy: float | None = None,
    ratio: float | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """Replace each eligible Linear/Conv1d/Conv2d/Conv3d layer of `model`, in place, by its two
    SVD factors at the rank `energy` or `ratio` gives, where that cuts its parameters and FLOPs.

    `energy`: the smallest rank keeping that fraction of sum(s^2); `ratio`: ceil(ratio * full
    rank); exactly one, in (0, 1]. `exclude`: regexes searched in module names. `example`: an
    input batch on the model's device, run once in eval mode to count output positions and FLOPs
    (reported per sample). Nothing is replaced unless at least one layer is: a model with nothing
    to factorize raises ValueError naming its class and each layer's reason.

    Returns a JSON-ready report: `plan` ({name: rank}, for `apply_plan`), per-layer `layers`
    (type, matrix `shape`, `full_rank`, `rank`, `energy` kept, `params`/`flops` before and after,
    `factorized`, `reason` where left alone) and whole-model `params`/`flops` before and after.

    Distributed training: call this on the plain module with full weights (unwrap DDP; gather an
    FSDP2 model, e.g. `trainer.pruning.shrink.plain_copy`), then wrap it again; a wrapped or
    sharded model is refused. The SVD of the same
    weights is bitwise repeatable on one machine at one thread count, but not across thread counts
    (measured on CPU, torch 2.13), so ranks may pick slightly different factors: factorize on one
    rank and broadcast the result (DDP's wrap broadcasts rank 0's parameters), or broadcast the
    plan and the factored state dict.
    """
    _check_method(energy, ratio)
    _check_plain(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FACTORIZABLE)}
    reasons = _left_alone(model, exclude)
    params_before = sum(p.numel() for p in model.parameters())
    positions, flops_before = _positions_and_flops(model, layers, example)
    records: dict[str, dict[str, Any]] = {}
    pairs: dict[str, nn.Sequential] = {}
    for name, layer in layers.items():
        m, n = _shape(layer)
        record: dict[str, Any] = {
            "type": type(layer).__name__,
            "shape": [m, n],
            "full_rank": min(m, n),
            "rank": None,
            "energy": None,
        }
        if name not in reasons:
            u, s, vh = svd(layer)
            rank = rank_for_ratio(len(s), ratio) if energy is None else rank_for_energy(s, energy)
            record["rank"] = rank
            record["energy"] = float(kept_energy(s)[rank - 1])
            if rank * (m + n) < m * n:
                pairs[name] = factor_pair(layer, rank)
                fill_factors(pairs[name], layer, u, s, vh)
            else:
                reasons[name] = (
                    f"rank {rank} does not pay: r*(m+n) = {rank * (m + n)} >= m*n = {m * n}"
                )
        record["factorized"] = name in pairs
        if name in reasons:
            record["reason"] = reasons[name]
        record.update(_costs(layer, record["rank"] if name in pairs else None, positions[name]))
        records[name] = record
    if not pairs:
        _nothing_to_factorize(model, reasons)
    for name, pair in pairs.items():
        _replace(model, name, pair)
    return {
        "energy": energy,
        "ratio": ratio,
        "plan": {name: records[name]["rank"] for name in pairs},
        "layers": records,
        "params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "flops": {"before": flops_before, "after": flops_per_sample(model, example)},
    }


def apply_plan(model: nn.Module, plan: Mapping[str, int]) -> nn.Module:
    """Give `model` (a fresh instance of the unfactorized architecture) the factorized structure
    of `plan` ({name: rank}, a `factorize` report's `plan`), in place, and return it. The new
    weights are placeholders: load the factorized model's state dict next. Checks every entry
    before changing anything."""
    _check_plain(model)
    for name, rank in plan.items():
        try:
            layer = model.get_submodule(name) if name else None
        except AttributeError:
            layer = None
        if not isinstance(layer, FACTORIZABLE):
            found = "no such module" if layer is None else type(layer).__name__
            raise ValueError(f"low-rank plan: {name!r} is not a Linear or Conv layer ({found})")
        if isinstance(layer, CONVS) and layer.groups != 1:
            raise ValueError(f"low-rank plan: {name!r} is a grouped convolution")
        full = min(_shape(layer))
        if not (isinstance(rank, int) and 1 <= rank <= full):
            raise ValueError(
                f"low-rank plan: rank of {name!r} must be in [1, {full}], got {rank!r}"
            )
    for name, rank in plan.items():
        _replace(model, name, factor_pair(model.get_submodule(name), rank))
    return model


def load_factorized(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """A factorized model exported as {"plan": ..., "state_dict": ...} (the low-rank callback's
    artifact) loaded into `model`, a fresh instance of the unfactorized architecture: read with
    `torch.load(weights_only=True)` (tensors and plain values only), `apply_plan`, then the
    weights (strict)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    apply_plan(model, saved["plan"]).load_state_dict(saved["state_dict"])
    return model
