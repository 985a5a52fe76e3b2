"""The `Quantize` callback in real fits: its int8 model against torchao applied directly to the
trained weights with the same calibration samples, its metrics against an evaluation by hand, the
files and logs it leaves, a resumed run against an uninterrupted one, and bad input."""

from __future__ import annotations

import copy
import importlib.util
import json
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.compression_runs import FAST_LATENCY
from tests.helpers import ENV, make_config
from tests.pt2e_reference import pt2e_static_reference
from trainer.build import build_trainer, check_callbacks_fit
from trainer.callbacks.base import Callback
from trainer.callbacks.quantize import Quantize
from trainer.compress.report import JSON_FILE, PLOT_FILE, TABLE_FILE, TENSORBOARD_TAG
from trainer.compress.samples import SAMPLE_SEED
from trainer.errors import ConfigError
from trainer.pruning.shrink import plain_copy
from trainer.state import TrainState

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed"
)
CNN = {"_target_": "trainer.models.CNN", "channels": [4], "hidden": 8}
QUANTIZE = {
    "_target_": "trainer.callbacks.quantize.Quantize",
    "calibration_batches": 2,
    "calibration_batch_size": 32,
    **FAST_LATENCY,
}
LOGGERS = {
    "jsonl": {"_target_": "trainer.loggers.jsonl.JsonlLogger"},
    "tensorboard": {"_target_": "trainer.loggers.tensorboard.TensorBoardLogger"},
}


def _fit(run_dir: Path, mode: str, extra: list[Callback] = (), **overrides: Any):
    cfg = make_config(
        model=CNN,
        dataset={"input_shape": [1, 16]},
        callbacks={"quantize": {**QUANTIZE, "mode": mode}},
        **overrides,
    )
    trainer, _ = build_trainer(cfg, ENV, run_dir)
    trainer.callbacks.extend(extra)
    try:
        state = trainer.fit()
    finally:
        trainer.logger.finish()
    return trainer, state


def _calibration(trainer) -> list[torch.Tensor]:
    """The callback's calibration batches, rebuilt: the first 2 x 32 samples of the training set
    in the fixed permutation."""
    data = trainer.train_loader.dataset
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    return list(torch.stack([data[int(i)][0] for i in order[:64]]).split(32))


def _accuracy(model: nn.Module, dataset) -> float:
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.stack([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        return (model(x).argmax(-1) == y).double().mean().item()


def _read_jsonl(path: Path) -> dict[str, float]:
    merged: dict[str, float] = {}
    for line in path.read_text().splitlines():
        merged.update(json.loads(line))
    return merged


# ----------------------------------------------------------------------------------- one fit


def test_static_int8_model_matches_pt2e_applied_directly_and_is_reported(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.compress.quantize import load_quantized

    trainer, state = _fit(tmp_path, "static", logger=LOGGERS)
    (callback,) = trainer.callbacks
    trained = plain_copy(trainer.model).eval()

    # torchao's PT2E calls on the same trained weights and the same calibration samples
    calibration = _calibration(trainer)
    reference = pt2e_static_reference(trained, calibration)
    x = torch.randn(7, 1, 16)
    loaded = load_quantized(tmp_path / "quantized_model.pt", copy.deepcopy(trained))
    with torch.no_grad():
        assert torch.equal(callback.quantized(x), reference(x))
        assert torch.equal(loaded(x), reference(x))  # the exported artifact

    # The rows: dense first (none was there), then the int8 model; accuracies by hand.
    metrics = state.metrics
    test_split, val_split = trainer.test_loader.dataset, trainer.val_loader.dataset
    assert metrics["compression/dense/test_accuracy"] == pytest.approx(
        _accuracy(trained, test_split)
    )
    assert metrics["compression/quantized_static/test_accuracy"] == pytest.approx(
        _accuracy(reference, test_split)
    )
    assert metrics["compression/quantized_static/val_accuracy"] == pytest.approx(
        _accuracy(reference, val_split)
    )
    assert metrics["compression/quantized_static/size_bytes"] == (
        (tmp_path / "quantized_model.pt").stat().st_size
    )
    report = json.loads((tmp_path / JSON_FILE).read_text())
    assert [row["stage"] for row in report["rows"]] == ["dense", "quantized_static"]
    assert (tmp_path / PLOT_FILE).is_file()

    logged = _read_jsonl(tmp_path / "metrics.jsonl")  # what the loggers received
    compression = {k: v for k, v in metrics.items() if k.startswith("compression/")}
    assert len(compression) > 20 and all(logged[k] == v for k, v in compression.items())
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    (text,) = events.Tensors(f"{TENSORBOARD_TAG}/text_summary")
    assert text.tensor_proto.string_val[0].decode() == (tmp_path / TABLE_FILE).read_text()
    assert text.step == state.step


# ----------------------------------------------------------------------------------- resume


class CrashAt(Callback):
    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.at:
            raise RuntimeError(f"simulated crash before step {self.at}")


def test_a_resumed_run_quantizes_at_its_end_like_an_uninterrupted_one(tmp_path):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    straight, straight_state = _fit(tmp_path / "straight", "dynamic")
    run = tmp_path / "resumed"
    checkpoint = {"every_steps": 5}
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(run, "dynamic", [CrashAt(7)], checkpoint=checkpoint)
    assert not (run / "quantized_model.pt").exists()  # nothing quantized in the crashed attempt
    resumed, state = _fit(run, "dynamic", checkpoint=checkpoint, resume="auto")

    x = torch.randn(9, 1, 16)
    reference = plain_copy(straight.model).eval()
    quantize_(reference, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    with torch.no_grad():
        expected = reference(x)  # torchao directly on the uninterrupted run's weights
        assert torch.equal(straight.callbacks[0].quantized(x), expected)
        assert torch.equal(resumed.callbacks[0].quantized(x), expected)
    for key in ("test_accuracy", "val_loss", "params", "nonzeros", "size_bytes"):
        for stage in ("dense", "quantized_dynamic"):
            name = f"compression/{stage}/{key}"
            assert state.metrics[name] == straight_state.metrics[name], name


# ----------------------------------------------------------------------------------- bad input


def test_bad_arguments_are_one_line_naming_the_key(tmp_path):
    cases = {
        "mode": ("int4", r"callbacks\.quantize\.mode: must be one of dynamic, weight_only, static"),
        "calibration_batches": (0, r"callbacks\.quantize\.calibration_batches: must be >= 1"),
        "artifact": ("../x.pt", r"callbacks\.quantize\.artifact: must be a file name"),
    }
    for key, (value, message) in cases.items():
        cfg = make_config(callbacks={"quantize": {**QUANTIZE, key: value}})
        with pytest.raises(ConfigError, match=message):
            build_trainer(cfg, ENV, tmp_path)
    assert not any(tmp_path.rglob("*.pt"))


def test_a_model_with_nothing_to_quantize_is_refused_before_training():
    conv_only = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())
    callback = Quantize(mode="dynamic")
    with pytest.raises(ConfigError, match=r"^callbacks\.quantize: Sequential has no Linear layer"):
        check_callbacks_fit(conv_only, [("callbacks.quantize", callback)])
    check_callbacks_fit(conv_only, [("callbacks.quantize", Quantize(mode="static"))])  # Conv: ok


def test_missing_or_old_torchao_and_old_torch_are_refused_at_construction(monkeypatch):
    import trainer.compress.quantize as quantize_module

    def not_installed(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(quantize_module, "version", not_installed)
    with pytest.raises(ConfigError, match=r"^callbacks\.quantize: quantization needs torchao, wh"):
        build_trainer(make_config(callbacks={"quantize": QUANTIZE}), ENV, Path("unused"))
    monkeypatch.setattr(quantize_module, "version", lambda name: "0.17.1")
    with pytest.raises(ValueError, match=r"torchao >= 0\.18, found 0\.17\.1"):
        Quantize()
    monkeypatch.setattr(quantize_module, "version", lambda name: "0.18.0")
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    with pytest.raises(ValueError, match=r"needs torch >= 2\.11, found torch 2\.10\.0"):
        Quantize()
