"""Batch normalization: which layer each BatchNorm follows, and folding it into that layer.

In eval mode a BatchNorm is a fixed affine map per channel,
``y = gamma * (z - running_mean) / sqrt(running_var + eps) + beta``, so it folds into the Conv or
Linear that produced ``z``: ``W' = W * s`` and ``b' = (b - running_mean) * s + beta`` with
``s = gamma / sqrt(running_var + eps)``. torch.nn.utils.fusion's `fuse_conv_bn_eval` and
`fuse_linear_bn_eval` do that math; `fold_batchnorm` applies them to every such pair of a model.
Quantization folds first, so that each int8 layer carries its BatchNorm's scale.

Which layer a BatchNorm follows is read from the model's data flow, a `torch.fx` trace, not from the
order of its attributes: a BatchNorm pairs with a Conv/Linear only when it alone reads that
layer's output and each of the two runs once per forward. (Structured pruning finds a channel's
BatchNorm entries through Torch-Pruning's dependency graph instead: trainer/pruning/graph.py.)
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

FOLDABLE = (nn.Linear, _ConvNd)  # Conv1d/2d/3d and their transposes


class _DataFlowTracer(fx.Tracer):
    """Records which module calls feed which, without running any module: Conv, Linear and
    BatchNorm layers stay single nodes even when a wrapper (FSDP2's `FSDP<Name>` subclasses) has
    renamed their class, and other modules are traced through their `forward` alone, so that no
    hook of a wrapper (FSDP2's all-gathers) runs on the tracing proxies."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*FOLDABLE, _BatchNorm)) or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        return m.forward(*args, **kwargs)


def batchnorm_pairs(model: nn.Module) -> dict[str, str]:
    """{name of a Conv/Linear: name of the BatchNorm that reads its output}, for a plain or
    wrapped (DDP's inner module, FSDP2, tensor-parallel) module tree.

    A pair needs: the BatchNorm's input is the layer's output and nothing else reads it, each
    runs once per forward, and the BatchNorm has as many features as the layer has outputs. A
    model without BatchNorm gives {} without tracing; one with BatchNorm that torch.fx cannot
    trace (data-dependent control flow) raises ValueError.
    """
    norms = {name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not norms:
        return {}
    try:
        graph = _DataFlowTracer().trace(model)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{type(model).__name__} has BatchNorm layers, but torch.fx cannot trace it to see "
            f"which layer each one follows: {first_line}"
        ) from None
    modules = dict(model.named_modules())
    calls = [node for node in graph.nodes if node.op == "call_module"]
    runs = Counter(node.target for node in calls)
    pairs: dict[str, str] = {}
    for node in calls:
        source = node.args[0] if node.target in norms and node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        layer, norm = modules[source.target], modules[node.target]
        width = (
            layer.out_features
            if isinstance(layer, nn.Linear)
            else getattr(layer, "out_channels", None)
        )
        if (
            isinstance(layer, FOLDABLE)
            and len(source.users) == 1
            and runs[source.target] == runs[node.target] == 1
            and width == norm.num_features
        ):
            pairs[source.target] = node.target
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of a plain `model` (the input is untouched) in eval mode, with each BatchNorm of
    `batchnorm_pairs` folded into its layer and replaced by `nn.Identity`. It computes what
    `model.eval()` computes, to float rounding, with the BatchNorm parameters gone (a layer
    without a bias gains one). A BatchNorm that follows no Conv/Linear, or that normalizes by
    the batch in eval too (`track_running_stats=False`), stays as it is.

    For a model wrapped by DDP or sharded by FSDP2, fold `trainer.pruning.plain_copy(model)`.
    """
    folded = copy.deepcopy(model).eval()
    for layer_name, norm_name in batchnorm_pairs(folded).items():
        layer, norm = folded.get_submodule(layer_name), folded.get_submodule(norm_name)
        if norm.running_mean is None:
            continue
        with torch.no_grad():
            if isinstance(layer, nn.Linear):
                fused = fuse_linear_bn_eval(layer, norm)
            else:
                fused = fuse_conv_bn_eval(layer, norm, transpose=layer.transposed)
        folded.set_submodule(layer_name, fused)
        folded.set_submodule(norm_name, nn.Identity())
    return folded
