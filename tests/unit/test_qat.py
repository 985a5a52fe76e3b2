"""Quantization-aware training: the fake-quantized layers against torchao's fake quantizers and
the post-training int8 weights they fake, the callback's phase and rows in real fits, its int8
model against post-training quantization of the same weights, a run stopped by a real signal
inside the phase and resumed against an uninterrupted one, and bad input."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.compression_runs import FAST_LATENCY
from tests.helpers import ENV, make_config
from tests.pt2e_reference import pt2e_static_reference
from trainer.build import build_trainer, check_callbacks_fit
from trainer.callbacks.base import Callback
from trainer.callbacks.qat import QuantizationAwareTraining
from trainer.compress import qat
from trainer.compress.quantize import load_quantized
from trainer.compress.samples import SAMPLE_SEED
from trainer.errors import ConfigError
from trainer.pruning.shrink import full_state_dict, plain_copy
from trainer.state import TrainState
from trainer.validation import check_run

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed"
)
CNN = {"_target_": "trainer.models.CNN", "channels": [4], "hidden": 8}
QAT = {
    "_target_": "trainer.callbacks.qat.QuantizationAwareTraining",
    "epochs": 1,
    "calibration_batches": 2,
    "calibration_batch_size": 32,
    **FAST_LATENCY,
}
STEPS_PER_EPOCH = 8  # 256 training samples in batches of 32


def _fit(run_dir: Path, extra: list[Callback] = (), qat_args: dict | None = None, **overrides):
    cfg = make_config(
        model=CNN,
        dataset={"input_shape": [1, 16]},
        callbacks={"qat": {**QAT, **(qat_args or {})}},
        **overrides,
    )
    trainer, _ = build_trainer(cfg, ENV, run_dir)
    trainer.callbacks.extend(extra)
    state = trainer.fit()
    return trainer, state


def _calibration(trainer) -> list[torch.Tensor]:
    data = trainer.train_loader.dataset
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    return list(torch.stack([data[int(i)][0] for i in order[:64]]).split(32))


def _torchao():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    def per_row(symmetric: bool) -> IntxFakeQuantizer:
        granularity = "per_channel" if symmetric else "per_token"
        return IntxFakeQuantizer(
            IntxFakeQuantizeConfig(torch.int8, granularity, is_symmetric=symmetric)
        )

    def dynamic_int8(model: nn.Module) -> nn.Module:
        model = copy.deepcopy(model).eval()
        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        return model

    return per_row, dynamic_int8


# ----------------------------------------------------------------------------------- layers


class Tokens(nn.Module):
    """A Conv1d and two Linear layers on (batch, tokens, features) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.fc(h)))


def _weight(w: torch.Tensor) -> torch.Tensor:
    """torchao's symmetric per-channel int8 fake quantizer on a weight, one row per output."""
    per_row, _ = _torchao()
    return per_row(True)(w.reshape(w.shape[0], -1)).reshape(w.shape)


def _fake_quantized_by_hand(m: Tokens, x: torch.Tensor, mode: str) -> torch.Tensor:
    """`Tokens` with torchao's fake quantizers applied directly to its weights and inputs."""
    per_row, _ = _torchao()

    def inputs(t: torch.Tensor) -> torch.Tensor:
        if mode == "weight_only":
            return t
        if mode == "dynamic":  # per token, symmetric
            return per_row(True)(t.reshape(-1, t.shape[-1])).reshape(t.shape)
        return per_row(False)(t.reshape(1, -1)).reshape(t.shape)  # per tensor, asymmetric

    if mode == "static":
        h = F.conv1d(inputs(x.transpose(1, 2)), _weight(m.conv.weight), m.conv.bias, 1, 1)
    else:
        h = m.conv(x.transpose(1, 2))
    h = F.linear(inputs(h.transpose(1, 2)), _weight(m.fc.weight), m.fc.bias)
    return F.linear(inputs(torch.relu(h)), _weight(m.head.weight), m.head.bias)


def test_fake_quantized_layers_keep_their_parameters_and_equal_torchao_applied_directly():
    per_row, dynamic_int8 = _torchao()
    torch.manual_seed(0)
    x = torch.randn(4, 7, 3) * 3
    for mode in ("dynamic", "weight_only", "static"):
        model = Tokens()
        float_model = copy.deepcopy(model)
        params, keys = list(model.parameters()), list(model.state_dict())
        assert qat.prepare(model, mode) == (3 if mode == "static" else 2)
        assert [id(p) for p in model.parameters()] == [id(p) for p in params]
        assert list(model.state_dict()) == keys  # no parameter or buffer added
        with torch.no_grad():
            assert torch.equal(model(x), float_model(x))  # off until switched on
            qat.set_fake_quant(model, True)
            out = model(x)

            expected = _fake_quantized_by_hand(float_model, x, mode)
            assert torch.equal(out, expected), mode
            assert not torch.equal(out, float_model(x))

            if mode == "dynamic":  # what it fakes: torchao's dynamic int8 layer
                linear = float_model.fc
                int8 = dynamic_int8(linear)
                assert torch.equal(int8.weight.dequantize(), _weight(linear.weight))
                tokens = torch.randn(64, 6) * 3
                torch.testing.assert_close(model.fc(tokens), int8(tokens), rtol=0, atol=1e-5)
                # an asymmetric per-token fake quant would be ~1000x further off
                asymmetric = F.linear(per_row(False)(tokens), _weight(linear.weight), linear.bias)
                assert (asymmetric - int8(tokens)).abs().max() > 1e-3

        plain = qat.to_float_layers(model)
        assert not any(qat.is_fake_quantized(m) for m in plain.modules())
        assert [type(m) for m in plain.modules()] == [type(m) for m in float_model.modules()]
        assert [id(p) for p in plain.parameters()] == [id(p) for p in params]


def test_static_fake_quantized_weights_are_pt2es_int8_weights():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(56, 5)).eval()
    tensors = pt2e_static_reference(model, [torch.randn(8, 1, 16)]).state_dict()
    qat.prepare(model, "static")
    qat.set_fake_quant(model, True)
    for i, layer in enumerate((model[0], model[3])):
        w = layer.weight
        scale = tensors[f"_scale_{i}"].view(-1, *[1] * (w.dim() - 1))
        int8 = tensors[f"_frozen_param{i}"].float()  # symmetric: zero points are 0
        with torch.no_grad():
            assert torch.equal(layer.weight_fake_quantizer(w), int8 * scale)


# ----------------------------------------------------------------------------------- fits


class Watch(Callback):
    """Whether fake quantization is on at each step, and the full weights at step `at`."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.on: dict[int, bool] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def on_step_start(self, state: TrainState) -> None:
        self.on[state.step] = qat.fake_quant_enabled(state.model)
        if state.step == self.at:
            self.weights = full_state_dict(state.model)


def test_the_phase_starts_at_epoch_e_minus_f_and_both_int8_models_are_ptq_of_their_weights(
    tmp_path,
):
    epochs, f = 3, 2
    start = (epochs - f) * STEPS_PER_EPOCH
    watch = Watch(at=start)
    trainer, state = _fit(tmp_path, [watch], {"mode": "static", "epochs": f}, max_epochs=epochs)
    callback = trainer.callbacks[0]
    assert watch.on == {step: step >= start for step in range(epochs * STEPS_PER_EPOCH)}
    assert [row["stage"] for row in state.compression.rows] == [
        "dense",
        "quantized_static",
        "qat_static",
    ]
    assert (tmp_path / "qat_model.pt").is_file()

    calibration = _calibration(trainer)
    x = torch.randn(6, 1, 16)
    float_model = CNN_model()
    with torch.no_grad():
        # PTQ when the phase began: PT2E applied directly to the weights as they were then
        float_model.load_state_dict(watch.weights)
        before = pt2e_static_reference(float_model.eval(), calibration)
        assert torch.equal(callback.ptq.quantized(x), before(x))
        # QAT's int8 model: PT2E applied directly to the trained float weights
        float_model.load_state_dict(full_state_dict(trainer.model))
        after = pt2e_static_reference(float_model.eval(), calibration)
        assert torch.equal(callback.quantized(x), after(x))
        # the exported artifact loads into a plain float model of the recipe's class
        loaded = load_quantized(tmp_path / "qat_model.pt", CNN_model())
        assert torch.equal(loaded(x), after(x))
    assert qat.fake_quant_enabled(trainer.model)  # the trained model as it trained


def CNN_model() -> nn.Module:
    from trainer.models import CNN as Model

    return Model(input_shape=[1, 16], num_classes=4, channels=[4], hidden=8)


def test_a_run_stopped_by_a_signal_inside_the_phase_resumes_bit_for_bit(tmp_path):
    from tests.faults import SendSignal

    _, dynamic_int8 = _torchao()
    args: dict[str, Any] = {"mode": "dynamic", "epochs": 2}
    common: dict[str, Any] = {"max_epochs": 3, "checkpoint": {"every_steps": 4}}
    straight, straight_state = _fit(tmp_path / "straight", qat_args=args, **common)

    run = tmp_path / "resumed"
    stop_at = STEPS_PER_EPOCH + 5  # inside the fake-quantized epochs (from step 8)
    first, first_state = _fit(run, [SendSignal("SIGUSR1", stop_at)], qat_args=args, **common)
    assert first_state.interrupted and first_state.step == stop_at
    assert [row["stage"] for row in first_state.compression.rows] == [
        "dense",
        "quantized_dynamic",
    ]
    assert not (run / "qat_model.pt").exists()  # the conversion waits for the resumed run
    resumed, state = _fit(run, qat_args=args, resume="auto", **common)

    weights, expected = full_state_dict(resumed.model), full_state_dict(straight.model)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    for name, value in straight_state.metrics.items():
        if name.startswith("compression/") and "latency" not in name and "memory" not in name:
            assert state.metrics[name] == value, name
    x = torch.randn(5, 1, 16)
    reference = dynamic_int8(qat.to_float_layers(plain_copy(straight.model)))
    with torch.no_grad():
        assert torch.equal(resumed.callbacks[0].quantized(x), reference(x))
        assert torch.equal(straight.callbacks[0].quantized(x), reference(x))


# ----------------------------------------------------------------------------------- bad input


def test_bad_arguments_and_models_are_one_line_naming_the_key(tmp_path):
    cases = {
        "epochs": (0, r"^callbacks\.qat\.epochs: must be an integer >= 1, got 0$"),
        "mode": ("int4", r"^callbacks\.qat\.mode: must be one of dynamic, weight_only, static"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_trainer(make_config(callbacks={"qat": {**QAT, key: value}}), ENV, tmp_path)
    with pytest.raises(ConfigError, match=r"^callbacks\.qat\.epochs: 3 fake-quantized epochs of 8"):
        _fit(tmp_path, qat_args={"epochs": 3, "mode": "dynamic"}, max_epochs=2)
    quantize_first = {"quantize": {**QAT, "_target_": "trainer.callbacks.quantize.Quantize"}}
    quantize_first["quantize"].pop("epochs")
    cfg = make_config(callbacks={**quantize_first, "qat": QAT})
    with pytest.raises(ConfigError, match=r"^callbacks\.qat: cannot follow callbacks\.quantize"):
        check_run(cfg, world_size=1)  # what the command line validates before building
    cfg = make_config(callbacks={"qat": QAT, **quantize_first})  # quantize would take fake layers
    with pytest.raises(ConfigError, match=r"^callbacks\.quantize: cannot follow callbacks\.qat"):
        check_run(cfg, world_size=1)
    assert not any(tmp_path.rglob("*.pt"))

    dynamic = QuantizationAwareTraining(mode="dynamic")
    for model, message in (
        (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten()), "Sequential has no Linear layer"),
        (nn.Linear(4, 2), "Linear has no plain Linear layer below it"),  # the root: no parent
        (nn.Sequential(nn.Linear(1, 2)), "nothing to quantize"),  # 1 input: PTQ leaves it
    ):
        with pytest.raises(ConfigError, match=rf"^callbacks\.qat: .*{message}"):
            check_callbacks_fit(model, [("callbacks.qat", dynamic)])
