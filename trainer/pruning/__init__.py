"""Magnitude pruning: masks and the cubic schedule (`masks`), coupled channel groups, physical
shrinking and the shrunk model's file (`graph`, through Torch-Pruning), gathering and export of
wrapped models (`shrink`), sparsity and size counts (`report`). The callback that drives them
during a fit is `trainer.callbacks.pruning.Pruning`; docs/pruning.md explains the whole feature.
`graph` needs the optional `torch-pruning` package and is imported on its own."""

from trainer.pruning.masks import (
    cubic_sparsity,
    prunable_layers,
    pruning_steps,
    sparsity_of,
    unstructured_masks,
)
from trainer.pruning.report import cpu_latency_ms, size_report
from trainer.pruning.shrink import export, full_state_dict, plain_copy

__all__ = [
    "cpu_latency_ms",
    "cubic_sparsity",
    "export",
    "full_state_dict",
    "plain_copy",
    "prunable_layers",
    "pruning_steps",
    "size_report",
    "sparsity_of",
    "unstructured_masks",
]
