"""torchao's PT2E static int8 calls written out directly: the reference the project's own
quantization (trainer/compress/quantize.py) and its callback are compared against."""

from __future__ import annotations

import copy

import torch
from torch import nn


def pt2e_static_reference(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """Export with a dynamic batch, prepare with the x86 quantizer's default config, calibrate
    on `calibration`, convert, and move to eval: torchao's documented recipe."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        copy.deepcopy(model), (calibration[0],), dynamic_shapes=({0: batch},)
    )
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    reference = convert_pt2e(prepared)
    move_exported_model_to_eval(reference)
    return reference
