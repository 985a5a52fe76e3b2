"""Magnitude pruning: masks and the cubic schedule (`masks`), physical shrinking and export
(`shrink`), the sparsity / size / latency report (`report`). The callback that drives them during a
fit is `trainer.callbacks.pruning.Pruning`; docs/pruning.md explains the whole feature."""

from trainer.pruning.masks import (
    cubic_sparsity,
    prunable_layers,
    pruning_steps,
    sparsity_of,
    structured_masks,
    unstructured_masks,
)
from trainer.pruning.report import cpu_latency_ms, size_report
from trainer.pruning.shrink import export, full_state_dict, plain_copy, shrink

__all__ = [
    "cpu_latency_ms",
    "cubic_sparsity",
    "export",
    "full_state_dict",
    "plain_copy",
    "prunable_layers",
    "pruning_steps",
    "shrink",
    "size_report",
    "sparsity_of",
    "structured_masks",
    "unstructured_masks",
]
