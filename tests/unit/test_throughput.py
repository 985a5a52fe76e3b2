"""FLOP counting and the throughput summary, against counts worked out by hand."""

from __future__ import annotations

import pytest
import torch

from trainer.models import MLP
from trainer.throughput import peak_flops, throughput_summary, train_flops_per_sample


def test_flops_of_an_mlp_match_the_matmul_count():
    model = MLP(input_shape=(20,), num_classes=5, hidden=(30, 10))
    sizes = [(20, 30), (30, 10), (10, 5)]
    matmuls = sum(2 * fan_in * fan_out for fan_in, fan_out in sizes)  # per sample, forward
    # Backward: a weight gradient for every layer, an input gradient for all but the first (the
    # data needs none).
    backward = matmuls + sum(2 * fan_in * fan_out for fan_in, fan_out in sizes[1:])
    inputs, targets = torch.randn(8, 20), torch.randint(0, 5, (8,))
    assert train_flops_per_sample(model, inputs, targets) == matmuls + backward
    assert all(p.grad is None for p in model.parameters())  # counted on a copy


def test_summary_per_rank_and_tokens_and_no_mfu_on_cpu():
    facts = {"flops_per_sample": 1000, "tokens_per_sample": 64}
    out = throughput_summary(400.0, 4, facts, torch.device("cpu"))
    assert out == {
        "samples_per_second": 400.0,
        "samples_per_second_per_rank": 100.0,
        "tokens_per_second": 25600.0,
        "tokens_per_second_per_rank": 6400.0,
        "flops_per_sample": 1000,
    }
    assert peak_flops(torch.device("cpu")) is None


def test_mfu_is_achieved_flops_over_the_peak_of_all_ranks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    facts = {"flops_per_sample": 6e9, "tokens_per_sample": 1}
    out = throughput_summary(10_000.0, 2, facts, torch.device("cuda", 0))
    assert out["mfu"] == pytest.approx(10_000 * 6e9 / (2 * 989e12))
