"""Compression techniques as plain functions over modules and tensors; the callbacks that apply
them during a fit stay thin. `quantize`: torchao int8 (static PT2E, dynamic, weight-only); `qat`:
fake-quantized layers for quantization-aware training; `lowrank`: SVD factorization of Linear and
Conv layers; `batchnorm`: folding; `distill`: the distillation loss; `report`: the compression
report; `samples`: the inputs every stage calibrates and measures on."""

from trainer.compress.lowrank import (
    apply_plan,
    factorize,
    flops_per_sample,
    load_factorized,
    rank_for_energy,
    rank_for_ratio,
)

__all__ = [
    "apply_plan",
    "factorize",
    "flops_per_sample",
    "load_factorized",
    "rank_for_energy",
    "rank_for_ratio",
]
