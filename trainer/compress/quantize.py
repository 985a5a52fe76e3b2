"""Post-training int8 quantization on CPU, built on torchao, and its weights-only artifact.

Three modes, each `quantize(model, mode, calibration)` returning a new model (the float model is
deep-copied, never changed):

- ``dynamic``: torchao `Int8DynamicActivationInt8WeightConfig` on the Linear layers (weights int8
  per row, activations quantized per token at run time);
- ``weight_only``: torchao `Int8WeightOnlyConfig` on the Linear layers (size only: no CPU speed-up);
- ``static``: PT2E, the model exported with a dynamic batch dimension, `X86InductorQuantizer` with
  its default static config, one calibration pass over the given batches; Linear and Conv1d/2d.
  Its int8 kernels exist only under `torch.compile`: run eagerly it is slower than fp32.

The artifact (`save_quantized` / `load_quantized`) loads without unpickling arbitrary code: it is
one `torch.save` file read back with `torch.load(weights_only=True)`, holding only tensors and plain
numbers, into a copy of the float model quantized the same way (or the same file compressed with
xz, `compress_artifact`: int8 stores a pruned model's zeros densely, and xz packs them). `torch.export.save`/`load` is not
used: `torch.export.load` (torch 2.13) unpickles weights with `weights_only=False` where the archive
says so, falls back to a full unpickle for example inputs, and parses shape expressions with sympy
(an `eval`), so a crafted .pt2 runs code. Its size on disk is the deployed size. A PT2E-converted
graph still holds the float weights it no longer reads; `quantize` drops them, so the static
model's state dict, and its artifact, hold only what the graph uses.

Process-wide state: `quantize_` is called with `set_inductor_config=False`, so it leaves inductor's
settings alone; but importing torchao's x86 PT2E quantizer (done on first use here) sets
`torch._inductor.config.pre_grad_custom_pass` to torchao's `QuantLiftUp` pass and registers its
int8 weight-packing passes for every later `torch.compile`, replacing a pre-grad pass set before.

FLOPs: `FlopCounterMode` counts 0 for int8 kernels (`_int_mm` and the quantized ops are not in its
table), so count FLOPs on the float model, whose structure the int8 model keeps.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import lzma
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import CheckpointError
from trainer.compress.report import xz_compressed
from trainer.config import ConfigError

MODES = ("dynamic", "weight_only", "static")

# The layers each mode quantizes: torchao's `quantize_` filters on nn.Linear; the x86 PT2E
# quantizer annotates linear, conv1d and conv2d.
QUANTIZABLE = {
    "dynamic": (nn.Linear,),
    "weight_only": (nn.Linear,),
    "static": (nn.Linear, nn.Conv1d, nn.Conv2d),
}

MIN_TORCHAO = (0, 18)  # the int8 `Int8Tensor` configs and PT2E's home in torchao
MIN_TORCH = (2, 11)  # torchao >= 0.18 supports only torch >= 2.11; its wheel does not say so
INSTALL = "pip install 'torchao>=0.18,<0.19'"


# ----------------------------------------------------------------------------------- the guard


def _major_minor(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return int(match[1]), int(match[2])


def torchao_problem(torch_version: str, torchao_version: str | None) -> str | None:
    """Why quantization cannot run with these versions (`None` for torchao not installed), as one
    line that names the fix; `None` when they fit."""
    if torchao_version is None:
        return f"quantization needs torchao, which is not installed: {INSTALL}"
    if _major_minor(torchao_version) < MIN_TORCHAO:
        return f"quantization needs torchao >= 0.18, found {torchao_version}: {INSTALL}"
    if _major_minor(torch_version) < MIN_TORCH:
        # Only the C++ kernels are skipped at import (one logged line); the Python API imports
        # and then fails or misbehaves later, so refuse here.
        return (
            f"torchao {torchao_version} needs torch >= 2.11, found torch {torch_version}: "
            "upgrade torch (pip install 'torch>=2.11') or run without quantization"
        )
    return None


def require_torchao() -> None:
    """Raise `ConfigError` with `torchao_problem`'s line unless torchao can be used here. Reads the
    installed version without importing torchao (whose import on an old torch half-works)."""
    try:
        installed: str | None = version("torchao")
    except PackageNotFoundError:
        installed = None
    problem = torchao_problem(torch.__version__, installed)
    if problem is not None:
        raise ConfigError(problem)


@functools.cache
def _ao() -> SimpleNamespace:
    """torchao's pieces used here, imported once after the guard."""
    require_torchao()
    # The PyPI wheel ships CUDA-only kernels that a CPU torch cannot load; torchao logs each
    # failure, and torch's pytree logs a deprecation for torchao's enums. Neither concerns int8 on
    # CPU, so keep them out of every run's output.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8Tensor,
            Int8WeightOnlyConfig,
            quantize_,
        )
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
            QuantizeTensorToInt8Kwargs,
        )
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return SimpleNamespace(
        quantize_=quantize_,
        # torchao's default `set_inductor_config=True` changes process-wide inductor settings
        # (coordinate descent tuning, int-mm fusion, the FX graph cache) for every later compile.
        configs={
            "dynamic": lambda: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
            "weight_only": lambda: Int8WeightOnlyConfig(set_inductor_config=False),
        },
        # Exactly the non-torch classes a torchao-mode artifact pickles: the int8 weight tensor,
        # the dynamic mode's activation-quantization settings and the enums in them.
        safe_globals=[Int8Tensor, QuantizeTensorToInt8Kwargs, PerRow, MappingType],
        prepare_pt2e=prepare_pt2e,
        convert_pt2e=convert_pt2e,
        move_exported_model_to_eval=move_exported_model_to_eval,
        static_quantizer=lambda: X86InductorQuantizer().set_global(
            get_default_x86_inductor_quantization_config()
        ),
    )


# ----------------------------------------------------------------------------------- quantizing


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}")


def _int8_linear(module: nn.Module, name: str = "") -> bool:
    """A Linear that torchao's dynamic and weight-only int8 can take: 0.18's per-row
    quantization fails on one input feature (`choose_qparams_affine`: shape '[B, 1]' is
    invalid), e.g. a transformer's embedding of scalar inputs, which then stays float."""
    return isinstance(module, nn.Linear) and module.in_features > 1


def _check_quantizable(model: nn.Module, mode: str) -> None:
    layers = QUANTIZABLE[mode]
    takes = _int8_linear if mode != "static" else (lambda m: isinstance(m, layers))
    if not any(takes(m) for m in model.modules()):
        names = "/".join(layer.__name__ for layer in layers)
        raise ConfigError(
            f"{type(model).__name__} has no {names} layer: nothing to quantize with mode {mode!r}"
        )


def quantize(
    model: nn.Module, mode: str, calibration: Iterable[torch.Tensor] | None = None
) -> nn.Module:
    """A new int8 model in eval mode from a plain CPU float model (unwrap DDP/FSDP first, e.g.
    with `trainer.pruning.plain_copy`). `calibration` (static only): input batches, each a tensor
    with the batch first; the first also serves as the export example."""
    _check_mode(mode)
    _check_quantizable(model, mode)
    if mode == "static":
        batches = list(calibration or ())
        if not batches:
            raise ConfigError("static quantization needs at least one calibration batch")
        return _static(model, batches)
    ao = _ao()
    quantized = copy.deepcopy(model).cpu().eval()
    ao.quantize_(quantized, ao.configs[mode](), filter_fn=_int8_linear)
    return quantized


def _static(model: nn.Module, batches: list[torch.Tensor]) -> torch.fx.GraphModule:
    ao = _ao()
    example = batches[0]
    if example.shape[0] < 2:  # export specializes a batch of size 1 instead of keeping it dynamic
        example = example.expand(2, *example.shape[1:])
    float_copy = copy.deepcopy(model).cpu().eval()  # export traces eval behaviour (dropout, BN)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(float_copy, (example,), dynamic_shapes=({0: batch},))
    prepared = ao.prepare_pt2e(exported.module(), ao.static_quantizer())
    with torch.no_grad():
        for x in batches:
            prepared(x)
    converted = ao.convert_pt2e(prepared)
    ao.move_exported_model_to_eval(converted)
    _drop_unread_tensors(converted)
    return converted


def _drop_unread_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Delete the parameters and buffers no node reads: after `convert_pt2e` these are the float
    weights that were replaced by their int8 copies (`_frozen_param*`), which would otherwise stay
    in the model's memory, its state dict and any export of it."""
    read = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    stored = [name for name, _ in graph_module.named_parameters()]
    stored += [name for name, _ in graph_module.named_buffers()]
    for name in stored:
        if name not in read:
            owner, _, leaf = name.rpartition(".")
            delattr(graph_module.get_submodule(owner), leaf)


# Per-tensor (activation) quantize/dequantize nodes: convert_pt2e writes their scale and zero
# point into the graph as plain numbers (args 1 and 2), not as tensors in the state dict.
_PER_TENSOR = {
    "quantized_decomposed.quantize_per_tensor.default",
    "quantized_decomposed.dequantize_per_tensor.default",
}


def _activation_qparams(graph_module: torch.fx.GraphModule) -> dict[str, tuple[float, int]]:
    return {
        node.name: (float(node.args[1]), int(node.args[2]))
        for node in graph_module.graph.nodes
        if node.op == "call_function" and str(node.target) in _PER_TENSOR
    }


# ----------------------------------------------------------------------------------- the artifact


def save_quantized(model: nn.Module, mode: str, path: str | os.PathLike) -> Path:
    """Write `quantize(..., mode)`'s model as a weights-only artifact; its size on disk is the
    deployed size. Written to a temporary name and renamed, so an earlier artifact at `path` is
    replaced only by a complete one."""
    _check_mode(mode)
    if (mode == "static") != isinstance(model, torch.fx.GraphModule):  # PT2E gives a graph
        raise ValueError(f"save_quantized: a {type(model).__name__} is not a {mode!r} model")
    artifact: dict[str, Any] = {"mode": mode, "tensors": model.state_dict()}
    if mode == "static":
        artifact["activation_qparams"] = _activation_qparams(model)
        # The input's shape after the batch dimension and its dtype, to rebuild the graph.
        example = next(n for n in model.graph.nodes if n.op == "placeholder").meta["val"]
        artifact["sample_shape"] = list(example.shape[1:])
        artifact["dtype"] = example.dtype
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    torch.save(artifact, partial)
    partial.replace(path)
    return path


def compress_artifact(path: str | os.PathLike) -> Path:
    """Write `<path>.xz`, the artifact compressed with xz: the file a pruned int8 model ships
    as, since the artifact stores its zeros densely (one byte each). `load_quantized` reads it,
    and so does `xz -d`. Its size is the report's `size_compressed_bytes`."""
    path = Path(path)
    compressed = path.with_name(path.name + ".xz")
    partial = compressed.with_name(compressed.name + ".tmp")
    partial.write_bytes(xz_compressed(path.read_bytes()))
    partial.replace(compressed)
    return compressed


# What `save_quantized` writes for each mode.
_ARTIFACT_KEYS = {
    "dynamic": ("tensors",),
    "weight_only": ("tensors",),
    "static": ("tensors", "activation_qparams", "sample_shape", "dtype"),
}


def load_quantized(path: str | os.PathLike, float_model: nn.Module) -> nn.Module:
    """The int8 model saved at `path`. `float_model` gives the architecture (any weights: they are
    all replaced; it is not changed): it is quantized the way the artifact's mode says, then the
    artifact's tensors (and, for static, its activation scales) are loaded into it. The loader
    takes a module rather than a factory because callers already build it from their config.
    Raises `CheckpointError` naming the file if it is missing, holds anything but tensors and
    plain values, or does not fit the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no quantized model file")
    ao = _ao()
    try:
        # An xz-compressed artifact (`compress_artifact`) is read back through memory.
        source = io.BytesIO(lzma.decompress(path.read_bytes())) if path.suffix == ".xz" else path
        with torch.serialization.safe_globals(ao.safe_globals):
            artifact = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, lzma.LZMAError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a loadable quantized model: {first}") from err
    mode = artifact.get("mode") if isinstance(artifact, Mapping) else None
    if mode not in MODES or not set(_ARTIFACT_KEYS[mode]) <= set(artifact):
        raise CheckpointError(f"{path}: not a quantized model artifact (no mode or missing keys)")
    if mode == "static":
        sample = torch.zeros(2, *artifact["sample_shape"], dtype=artifact["dtype"])
        model = quantize(float_model, mode, [sample])  # the graph; its numbers come next
    else:
        model = quantize(float_model, mode)
    _check_fits(model.state_dict(), artifact["tensors"], path, type(float_model).__name__)
    model.load_state_dict(artifact["tensors"], strict=True, assign=True)
    if mode == "static":
        _set_activation_qparams(model, artifact["activation_qparams"], path)
    return model


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{type(value).__name__} {tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def _check_fits(expected: Mapping[str, torch.Tensor], saved: Any, path: Path, cls: str) -> None:
    """The same names, tensor types, shapes and dtypes: `assign=True` would otherwise accept a
    float tensor where the model holds an int8 one."""
    if not isinstance(saved, Mapping) or set(expected) != set(saved):
        diff = sorted(set(expected) ^ set(saved if isinstance(saved, Mapping) else ()))
        raise CheckpointError(f"{path}: does not fit {cls}: tensors differ ({', '.join(diff)})")
    for name, tensor in expected.items():
        if _describe(saved[name]) != _describe(tensor):
            raise CheckpointError(
                f"{path}: does not fit {cls}: {name} is {_describe(saved[name])}, "
                f"the model's is {_describe(tensor)}"
            )


def _set_activation_qparams(
    graph_module: torch.fx.GraphModule, qparams: Mapping[str, tuple[float, int]], path: Path
) -> None:
    if set(qparams) != set(_activation_qparams(graph_module)):
        raise CheckpointError(f"{path}: its activation quantizers do not fit the model's graph")
    for node in graph_module.graph.nodes:
        if node.name in qparams:
            scale, zero_point = qparams[node.name]
            node.args = (node.args[0], float(scale), int(zero_point), *node.args[3:])
    graph_module.recompile()
