"""What compression stages calibrate and measure on: the first samples of one fixed permutation
of the training set, the same on every rank and in every stage, so that rows of the compression
report are timed on the same inputs and a quantizer calibrates on what it was trained on; and a
stage model's val and test metrics through the loop's own evaluation."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import default_collate

from trainer.state import TrainState

SAMPLE_SEED = 0  # the fixed permutation of the training set that samples are taken from


def fixed_samples(state: TrainState, count: int, model: nn.Module | None = None) -> torch.Tensor:
    """The first `count` inputs of a fixed permutation of the training set; without a training
    set, random inputs of `model.input_shape` (None: no fallback, a ValueError)."""
    data = state.train_data
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    if data is not None and len(data) > 0:
        order = torch.randperm(len(data), generator=generator)
        inputs, _ = default_collate([data[int(i)] for i in order[:count]])
        return inputs.cpu()
    shape = getattr(model, "input_shape", None)
    if not shape:
        raise ValueError("no training samples to calibrate or measure on")
    return torch.randn(count, *shape, generator=generator)


def evaluated(state: TrainState, model: nn.Module | None = None) -> dict[str, float]:
    """The val and test metrics of `model` (None: the trainer's own) through the loop's exact
    evaluation (`state.measure`; every rank calls it). A state without one (built by hand): the
    latest validation's metrics for the trainer's own model, none for another."""
    if state.measure is None:
        if model is not None:
            return {}
        return {k: v for k, v in state.metrics.items() if k.startswith(("val/", "test/"))}
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        metrics.update(state.measure(split, model) or {})
    return metrics
