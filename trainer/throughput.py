"""Throughput figures: FLOPs per training sample (torch.utils.flop_counter), model FLOPs
utilisation (MFU) against the accelerator's published dense bf16 peak, and the summary's
throughput keys."""

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


# What the summary's throughput measures, against the progress bar's figure: printed under the
# summary table, since the two can differ many times over on a loaded machine.
SUMMARY_NOTE = (
    "train_step_*_per_second: samples (tokens) trained per second of time spent inside training "
    "steps, every step but the first. The progress bar's samples/s: the latest log window's "
    "samples over its wall-clock time, data loading, evaluation, checkpoints and logging included."
)


def throughput_summary(
    samples_per_second: float, world_size: int, facts: dict[str, int], device: torch.device
) -> dict[str, float]:
    """The summary's training throughput, each key named after what it measures: global and
    per-rank samples/s inside training steps (`Trainer.samples_per_second`), tokens/s for
    sequence models (more than one token per sample), training FLOPs per sample, and MFU where
    the peak is known. Without a timed step (a resume with one step left, say) there is no rate."""
    out: dict[str, float] = {}
    if samples_per_second > 0:
        out["train_step_samples_per_second"] = samples_per_second
        out["train_step_samples_per_second_per_rank"] = samples_per_second / world_size
        if facts["tokens_per_sample"] > 1:
            tokens_per_second = samples_per_second * facts["tokens_per_sample"]
            out["train_step_tokens_per_second"] = tokens_per_second
            out["train_step_tokens_per_second_per_rank"] = tokens_per_second / world_size
    out["train_flops_per_sample"] = facts["flops_per_sample"]
    peak = peak_flops(device)
    if peak and samples_per_second > 0:
        out["mfu"] = samples_per_second * facts["flops_per_sample"] / (peak * world_size)
    return out


def human_flops(flops: float) -> str:
    """A FLOP count in the unit that keeps it below 1000: 2047488 -> '2.05 MFLOP'."""
    units = ("", "k", "M", "G", "T", "P")
    power = 0
    while abs(flops) >= 1000 and power < len(units) - 1:
        flops /= 1000
        power += 1
    return f"{flops:.3g} {units[power]}FLOP"
