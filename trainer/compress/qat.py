"""Fake-quantized layers for quantization-aware training (QAT), and the way back to float layers.

`prepare(model, mode)` swaps, in place, each plain `nn.Linear` (and for `static`, `nn.Conv1d` /
`nn.Conv2d`) for a fake-quantized twin that holds the SAME `weight` and `bias` Parameter objects
under the same names and adds no parameter or buffer: state dicts, checkpoints, DDP, FSDP2 and the
optimizer see the model unchanged. Fake quantization starts disabled; `set_fake_quant(model, on)`
switches it. `to_float_layers(model)` swaps the twins back for plain layers (same weights), so
that `trainer.compress.quantize.quantize` converts a QAT model exactly as it converts any float
model: one converter for post-training quantization and QAT.

The rounding is torchao's (`torchao.quantization.qat`: `FakeQuantizedLinear`, `IntxFakeQuantizer`,
straight-through gradients). Each mode fakes what its post-training int8 model computes:

    mode         weights                        activations (the layer's input)
    dynamic      int8 per output channel,       int8 per token, symmetric, from each batch
                 symmetric
    weight_only  the same                       float
    static       the same                       int8 per tensor, asymmetric, from each batch

Weights: the fake-quantized weight equals the PTQ model's int8 weight dequantized, bit for bit
(torchao's `Int8Tensor` for dynamic / weight_only, PT2E's x86 per-channel weights for static).
Dynamic activations: torchao 0.18's `per_token` fake quantizer refuses `is_symmetric=True`, but
its symmetric `per_channel` quantizer applied to the input viewed as (tokens, features) is per
token, and its layer output matches the dynamic int8 layer's to float rounding (an asymmetric
per-token fake quant is off by about as much as the float layer is). Static activations: PT2E
calibrates one fixed range per tensor (a histogram observer); torchao's fake quantizers have no
per-tensor observer, so the range is each batch's (its asymmetric `per_token` quantizer on the
input viewed as one row). That keeps the layers stateless: nothing to checkpoint, nothing that
could differ between ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch
from torch import nn

from trainer.compress.quantize import MODES, _ao

# How a tensor is viewed as 2-D rows for torchao's fake quantizers: one row per output channel
# (weights), per token (inputs of shape (..., features)) or one row for the whole tensor.
_ROWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "channel": lambda t: t.reshape(t.shape[0], -1),
    "token": lambda t: t.reshape(-1, t.shape[-1]),
    "tensor": lambda t: t.reshape(1, -1),
}


@functools.cache
def _qat() -> SimpleNamespace:
    """torchao's QAT pieces, imported after the version guard (`_ao`)."""
    _ao()
    from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    return SimpleNamespace(
        linear=FakeQuantizedLinear,
        quantizer=IntxFakeQuantizer,
        # torchao's per-channel quantizer: rows, symmetric; its per-token one: rows, asymmetric.
        symmetric=lambda: IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        asymmetric=lambda: IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
    )


class RowFakeQuantizer(nn.Module):
    """torchao's int8 fake quantizer on a 2-D view of the tensor (see `_ROWS`); no state."""

    def __init__(self, rows: str, symmetric: bool) -> None:
        super().__init__()
        qat = _qat()
        self.rows = rows
        self.quantizer = qat.quantizer(qat.symmetric() if symmetric else qat.asymmetric())
        self.quantizer.enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantizer.enabled:
            return x
        return self.quantizer(_ROWS[self.rows](x)).reshape(x.shape)


def _weight_quantizer() -> RowFakeQuantizer:
    return RowFakeQuantizer("channel", symmetric=True)


def _input_quantizer(mode: str) -> RowFakeQuantizer | None:
    if mode == "dynamic":
        return RowFakeQuantizer("token", symmetric=True)
    if mode == "static":
        return RowFakeQuantizer("tensor", symmetric=False)
    return None  # weight_only


class _FakeQuantizedConv:
    """Conv forward on the fake-quantized input and weight; mixed into nn.Conv1d / nn.Conv2d."""

    activation_fake_quantizer: RowFakeQuantizer | None
    weight_fake_quantizer: RowFakeQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return self._conv_forward(x, self.weight_fake_quantizer(self.weight), self.bias)


class FakeQuantizedConv1d(_FakeQuantizedConv, nn.Conv1d):
    pass


class FakeQuantizedConv2d(_FakeQuantizedConv, nn.Conv2d):
    pass


_FAKE_CONV = {nn.Conv1d: FakeQuantizedConv1d, nn.Conv2d: FakeQuantizedConv2d}
_CONV_ARGS = ("stride", "padding", "dilation", "groups", "padding_mode")


def _conv_twin(conv: nn.Module, cls: type) -> nn.Module:
    """A `cls` conv with `conv`'s hyperparameters holding its very Parameters (built on the meta
    device: no weights are allocated only to be dropped)."""
    twin = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        bias=False,
        device="meta",
        **{name: getattr(conv, name) for name in _CONV_ARGS},
    )
    twin.weight, twin.bias = conv.weight, conv.bias
    return twin


# ----------------------------------------------------------------------------------- swapping


def fakeable(module: nn.Module, mode: str) -> bool:
    """Whether `prepare` swaps `module`: a plain Linear (static: or Conv1d/2d; a subclass may have
    its own forward, so it is left alone) with at least 2 weights per output channel (torchao's
    per-channel quantizer needs 2; PTQ's dynamic int8 leaves a 1-input Linear float too)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d) if mode == "static" else (nn.Linear,)
    return type(module) in kinds and module.weight[0].numel() > 1


def _fake(module: nn.Module, mode: str) -> nn.Module:
    if type(module) is nn.Linear:
        twin = _qat().linear.from_linear(module)  # holds the Linear's own Parameters
    else:
        twin = _conv_twin(module, _FAKE_CONV[type(module)])
    twin.activation_fake_quantizer = _input_quantizer(mode)
    twin.weight_fake_quantizer = _weight_quantizer()
    return twin.train(module.training)


def _plain(module: nn.Module) -> nn.Module:
    if isinstance(module, _qat().linear):
        plain = module.to_linear()  # the same Parameters
    else:
        plain = _conv_twin(module, next(k for k, v in _FAKE_CONV.items() if isinstance(module, v)))
    return plain.train(module.training)


def is_fake_quantized(module: nn.Module) -> bool:
    return isinstance(module, (_qat().linear, _FakeQuantizedConv))


def _swap(model: nn.Module, take: Callable[[nn.Module], bool], make: Callable) -> int:
    """Replace every child module `take` accepts by `make(child)`, everywhere it appears (a
    module shared by two parents gets one twin). Returns how many modules were replaced."""
    twins: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if take(child):
                if id(child) not in twins:
                    twins[id(child)] = make(child)
                setattr(parent, name, twins[id(child)])
    return len(twins)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def fakeable_layers(model: nn.Module, mode: str) -> list[str]:
    """The names of the layers `prepare` would swap (the model itself is never swapped)."""
    check_mode(mode)
    return [name for name, m in model.named_modules() if name and fakeable(m, mode)]


def prepare(model: nn.Module, mode: str) -> int:
    """Swap the model's layers for fake-quantized ones, in place, fake quantization off. Returns
    how many layers were swapped."""
    check_mode(mode)
    return _swap(model, lambda m: fakeable(m, mode), lambda m: _fake(m, mode))


def to_float_layers(model: nn.Module) -> nn.Module:
    """Swap fake-quantized layers back for plain float ones with the same weights, in place (call
    it on a copy: a wrapped model's DDP / FSDP2 hooks stay on the old modules). Returns `model`."""
    _swap(model, is_fake_quantized, _plain)
    return model


def _quantizers(model: nn.Module) -> Iterator[RowFakeQuantizer]:
    return (m for m in model.modules() if isinstance(m, RowFakeQuantizer))


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization on or off in every fake-quantized layer of `model`."""
    for quantizer in _quantizers(model):
        quantizer.quantizer.enabled = enabled


def fake_quant_enabled(model: nn.Module) -> bool:
    return any(q.quantizer.enabled for q in _quantizers(model))
