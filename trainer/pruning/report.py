"""The pruning summary: sparsity per layer and overall, parameters, size on disk, CPU latency.

Size is counted three ways: `dense` (every parameter stored, zeros included), `sparse_csr` (each
pruned weight as a CSR matrix of its rows, `torch.sparse_csr_tensor` with int32 indices; everything
else dense) and, for a shrunk structured model, its dense size. Latency is the median of timed
forward passes of one batch on one CPU thread. Unstructured sparsity leaves the dense kernels'
work unchanged, so it gives no latency gain on dense kernels; only the shrunk structured model
runs faster.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def layer_sparsity(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{name: {"params", "nonzero", "sparsity"}} for each tensor."""
    out = {}
    for name, t in tensors.items():
        n, nz = t.numel(), int(torch.count_nonzero(t))
        out[name] = {"params": n, "nonzero": nz, "sparsity": 1.0 - nz / n if n else 0.0}
    return out


def overall_sparsity(layers: Mapping[str, Mapping[str, float]]) -> float:
    total = sum(v["params"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    return 1.0 - nonzero / total if total else 0.0


def dense_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def csr_bytes(t: torch.Tensor) -> int:
    """Bytes of `t` (rows = dim 0, the rest flattened) as a CSR matrix with int32 indices."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta", "invariant checks off"
        warnings.simplefilter("ignore", UserWarning)
        matrix = t.detach().reshape(t.shape[0], -1).to_sparse_csr()
        csr = torch.sparse_csr_tensor(
            matrix.crow_indices().to(torch.int32),
            matrix.col_indices().to(torch.int32),
            matrix.values(),
            size=matrix.shape,
            check_invariants=False,
        )
    parts = (csr.crow_indices(), csr.col_indices(), csr.values())
    return sum(p.numel() * p.element_size() for p in parts)


def sparse_bytes(state: Mapping[str, torch.Tensor], sparse_names: Sequence[str]) -> int:
    """Size with the tensors in `sparse_names` stored as CSR and the rest dense."""
    return sum(
        csr_bytes(t) if name in sparse_names and t.dim() >= 2 else t.numel() * t.element_size()
        for name, t in state.items()
    )


@torch.inference_mode()
def cpu_latency_ms(
    model: nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 3
) -> float:
    """Median wall time in milliseconds of `model(example)` on one CPU thread, in eval mode."""
    threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(max(repeats, 1)):
            started = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return 1000.0 * statistics.median(times)


def size_report(state: Mapping[str, torch.Tensor], weight_names: Sequence[str]) -> dict[str, Any]:
    """Per-layer and overall sparsity of `weight_names`, whole-model counts and sizes."""
    layers = layer_sparsity({n: state[n] for n in weight_names})
    return {
        "sparsity": overall_sparsity(layers),
        "layers": layers,
        "params": sum(t.numel() for t in state.values() if t.is_floating_point()),
        "nonzero_params": sum(
            int(torch.count_nonzero(t)) for t in state.values() if t.is_floating_point()
        ),
        "size_bytes": {
            "dense": dense_bytes(state),
            "sparse_csr": sparse_bytes(state, weight_names),
        },
    }


def flat_metrics(report: Mapping[str, Any], prefix: str = "pruning/") -> dict[str, float]:
    """The report's numbers as flat `pruning/...` metrics for `state.log` and the loggers."""
    out: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[prefix + key] = float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}/{k}" if key else str(k))

    for key in ("sparsity", "target_sparsity", "params", "nonzero_params", "shrunk_params"):
        if key in report:
            walk(report[key], key)
    for key in ("size_bytes", "latency_ms", "accuracy"):
        walk(report.get(key, {}), key)
    for name, layer in report.get("layers", {}).items():
        walk(layer["sparsity"], f"layer/{name}")
    return out
