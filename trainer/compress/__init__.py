"""Compression techniques as plain functions over modules and tensors; the callbacks that apply
them during a fit stay thin. `lowrank`: SVD factorization of Linear and Conv layers."""

from trainer.compress.lowrank import (
    apply_plan,
    factorize,
    flops_per_sample,
    rank_for_energy,
    rank_for_ratio,
)

__all__ = ["apply_plan", "factorize", "flops_per_sample", "rank_for_energy", "rank_for_ratio"]
