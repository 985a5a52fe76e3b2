"""Throughput figures: FLOPs per training sample (torch.utils.flop_counter) and model FLOPs
utilisation (MFU) against the accelerator's published dense bf16 peak."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.loop import flat_cross_entropy

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s. MFU is
# quoted against the bf16 peak whatever precision the run uses, as torchtitan and PaLM do.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
}


def train_flops_per_sample(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """FLOPs of one forward + backward pass per sample, counted on a copy of the bare model whose
    parameters and buffers live on the meta device: shapes without storage, so counting costs no
    memory and no compute whatever the model's size. On meta, attention runs as plain matmuls,
    which the counter sees; CPU's fused attention kernel is one it has no formula for."""
    on_meta = {id(t): _meta_like(t) for t in itertools.chain(model.parameters(), model.buffers())}
    probe = copy.deepcopy(model, memo=on_meta)
    with FlopCounterMode(display=False) as counter:
        logits = probe(inputs.to("meta"))
        flat_cross_entropy(logits, targets.to("meta")).backward()
    return counter.get_total_flops() // len(inputs)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is not known (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # more specific names come first
        if key in name:
            return flops
    return None


def throughput_summary(
    samples_per_second: float, world_size: int, facts: dict[str, int], device: torch.device
) -> dict[str, float]:
    """Global and per-rank samples/s and tokens/s, FLOPs per sample, and MFU where the peak is known."""
    tokens_per_second = samples_per_second * facts["tokens_per_sample"]
    out = {
        "samples_per_second": samples_per_second,
        "samples_per_second_per_rank": samples_per_second / world_size,
        "tokens_per_second": tokens_per_second,
        "tokens_per_second_per_rank": tokens_per_second / world_size,
        "flops_per_sample": facts["flops_per_sample"],
    }
    peak = peak_flops(device)
    if peak:
        out["mfu"] = samples_per_second * facts["flops_per_sample"] / (peak * world_size)
    return out
