"""FLOP counting and the throughput summary, against counts worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.loop import flat_cross_entropy
from trainer.models import CNN, MLP, GRUClassifier, TinyGPT, TransformerClassifier
from trainer.throughput import human_flops, peak_flops, throughput_summary, train_flops_per_sample

CPU = torch.device("cpu")


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


@pytest.mark.parametrize(
    ("model_class", "input_shape", "classes", "integer_inputs"),
    [
        (CNN, (1, 28, 28), 10, False),
        (GRUClassifier, (28, 28), 10, False),
        (TransformerClassifier, (16, 12), 10, False),
        (TinyGPT, (32,), 50, True),
    ],
)
def test_flops_counted_on_the_meta_device_equal_a_count_on_real_weights(
    model_class, input_shape, classes, integer_inputs
):
    torch.manual_seed(0)
    model = model_class(input_shape=input_shape, num_classes=classes)
    if integer_inputs:  # a language model: token ids in, a target per position
        inputs = torch.randint(0, classes, (4, *input_shape))
        targets = torch.randint(0, classes, (4, *input_shape))
    else:
        inputs, targets = torch.randn(4, *input_shape), torch.randint(0, classes, (4,))
    # The reference: the real model, a real pass. With attention in plain matmuls: CPU's fused
    # attention kernel is an op the counter has no formula for, so it would count nothing there.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        flat_cross_entropy(model(inputs), targets).backward()
    model.zero_grad(set_to_none=True)
    assert train_flops_per_sample(model, inputs, targets) == counter.get_total_flops() // 4 > 0
    assert all(p.grad is None and p.device.type == "cpu" for p in model.parameters())


def test_summary_names_what_it_measures_and_tokens_only_for_sequences():
    # A language model: 64 tokens a sample, so tokens/s is samples/s x 64.
    out = throughput_summary(400.0, 4, {"flops_per_sample": 1000, "tokens_per_sample": 64}, CPU)
    assert out == {
        "train_step_samples_per_second": 400.0,
        "train_step_samples_per_second_per_rank": 400.0 / 4,
        "train_step_tokens_per_second": 400.0 * 64,
        "train_step_tokens_per_second_per_rank": 400.0 * 64 / 4,
        "train_flops_per_sample": 1000,
    }
    assert peak_flops(CPU) is None  # no MFU on CPU
    # A classifier (one target a sample): tokens would only repeat samples.
    classifier = throughput_summary(
        400.0, 4, {"flops_per_sample": 1000, "tokens_per_sample": 1}, CPU
    )
    assert not any("tokens" in key for key in classifier)
    # No timed step (a resume with one step left): no rate at all rather than a rate of 0.
    untimed = throughput_summary(0.0, 1, {"flops_per_sample": 1000, "tokens_per_sample": 64}, CPU)
    assert untimed == {"train_flops_per_sample": 1000}


@pytest.mark.parametrize(
    ("flops", "shown"),
    [(999, "999 FLOP"), (2_047_488, "2.05 MFLOP"), (1.234e9, "1.23 GFLOP"), (5e18, "5e+03 PFLOP")],
)
def test_flops_in_human_units(flops, shown):
    assert human_flops(flops) == shown


def test_mfu_is_achieved_flops_over_the_peak_of_all_ranks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    facts = {"flops_per_sample": 6e9, "tokens_per_sample": 1}
    out = throughput_summary(10_000.0, 2, facts, torch.device("cuda", 0))
    assert out["mfu"] == pytest.approx(10_000 * 6e9 / (2 * 989e12))
