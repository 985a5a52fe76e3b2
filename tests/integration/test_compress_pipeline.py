"""The compression pipeline: `experiment=compress_only` from a run trained earlier through the real
CLI (zero epochs: only the fit-end stages), its fine-tune epochs from step 0, the presets' plans,
the xz-compressed int8 artifact the report sizes, and quantization skipped when a fit stops to
be resumed."""

from __future__ import annotations

import importlib.util
import json
import logging
import lzma

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.compression_runs import FAST_LATENCY
from tests.conftest import run_cli
from tests.faults import SendSignal
from tests.helpers import ENV, make_config
from trainer.build import build_trainer
from trainer.callbacks.pruning import Pruning
from trainer.callbacks.quantize import Quantize
from trainer.cli import recipes_dir
from trainer.compress.quantize import load_quantized
from trainer.config import validate
from trainer.export import load_model
from trainer.pruning.masks import prunable_layers
from trainer.targets import build

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed"
)
FAST_QUANTIZE = [
    "callbacks.quantize.compiled_latency=false",
    "callbacks.quantize.latency_repeats=3",
    "callbacks.quantize.latency_budget_s=0.1",
    "callbacks.quantize.latency_batches=[1,8]",
]
QUANTIZE = {
    "_target_": "trainer.callbacks.quantize.Quantize",
    "calibration_batches": 2,
    "calibration_batch_size": 32,
    **FAST_LATENCY,
}
CNN = {"_target_": "trainer.models.CNN", "channels": [4], "hidden": 8}
SHAPE = {"input_shape": [1, 16]}


def test_compress_only_compresses_a_trained_run_without_training_it(tmp_path):
    dense = tmp_path / "dense"
    trained = run_cli(["logger=none", "max_epochs=1", f"hydra.run.dir={dense}"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    [newest] = (dense / "checkpoints").iterdir()

    compressed = tmp_path / "compressed"
    args = ["experiment=compress_only", f"init_from={dense}", "max_epochs=0", "logger=none"]
    proc = run_cli([*args, *FAST_QUANTIZE, f"hydra.run.dir={compressed}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert (
        f"init_from: model weights from {newest} (the run's newest complete checkpoint)" in output
    )
    summary = json.loads((compressed / "summary.json").read_text())
    assert summary["steps"] == 0  # nothing trained: the fit-end stages only
    # Pruning ran at the fit's end on the dense weights: the report's dense row is the dense run.
    assert abs(summary["pruning/sparsity"] - 0.8) < 1e-3
    # The int8 artifact stores the zeros densely; the xz file beside it is what the report sizes,
    # and it loads to the same model.
    rows = json.loads((compressed / "compression_report.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == ["dense", "pruned", "quantized_static"]
    assert rows[0]["test_accuracy"] == pytest.approx(
        json.loads((dense / "summary.json").read_text())["test/accuracy"]
    )
    [int8] = [row for row in rows if row["stage"] == "quantized_static"]
    artifact = compressed / "quantized_model.pt"
    shipped = compressed / "quantized_model.pt.xz"
    assert int8["size_bytes"] == artifact.stat().st_size
    assert int8["size_compressed_bytes"] == shipped.stat().st_size
    assert shipped.stat().st_size == len(lzma.compress(artifact.read_bytes(), preset=6))
    assert int8["size_compressed_bytes"] < int8["size_bytes"] / 2
    float_model = load_model(compressed / "model.pt")
    x = torch.randn(8, *float_model.input_shape, generator=torch.Generator().manual_seed(0))
    from_plain, from_xz = (load_quantized(p, float_model) for p in (artifact, shipped))
    assert torch.equal(from_plain(x), from_xz(x))

    # Weights that do not fit this run's model: one line naming the file and the weight, exit 3,
    # and no run folder left behind.
    refused = tmp_path / "refused"
    proc = run_cli([*args, "model.hidden=64", f"hydra.run.dir={refused}"], tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if "error" in line]
    assert line.startswith(f"hooktrain: checkpoint error: init_from: {newest}: does not fit")
    assert "classifier.1.weight is [128, " in line and "[64, " in line
    assert not refused.exists()


def test_fine_tune_epochs_start_from_the_given_weights_at_step_zero(tmp_path):
    source_cfg = make_config(model=CNN, dataset=SHAPE, checkpoint={"save_final": True})
    source, _ = build_trainer(source_cfg, ENV, tmp_path / "source")
    source.fit()
    dense_val = source.measure(source.val_loader, "val")
    pruning = {"_target_": "trainer.callbacks.pruning.Pruning", "sparsity": 0.8}
    cfg = make_config(
        model=CNN,
        dataset=SHAPE,
        init_from=str(tmp_path / "source"),
        max_epochs=1,
        callbacks={"pruning": {**pruning, "finetune_epochs": 1}},
    )
    trainer, _ = build_trainer(cfg, ENV, tmp_path / "finetuned")
    state = trainer.fit()
    [callback] = [c for c in trainer.callbacks if isinstance(c, Pruning)]
    assert callback.pruned_steps == [0] and state.step == trainer.state.steps_per_epoch
    dense_row = state.compression.row("dense")  # measured before pruning: the source's weights
    assert dense_row["val_accuracy"] == dense_val["val/accuracy"]
    pruned = [m.weight for _, m in prunable_layers(trainer.model)]
    zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    assert abs(zeros - 0.8) < 0.01  # held through every fine-tune step


def test_quantize_skips_a_fit_stopped_by_a_signal_to_be_resumed(tmp_path, caplog):
    cfg = make_config(model=CNN, dataset=SHAPE, max_epochs=3, callbacks={"quantize": QUANTIZE})
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    trainer.callbacks.insert(0, SendSignal("SIGTERM", step=3))
    with caplog.at_level(logging.INFO, logger="hooktrain"):
        state = trainer.fit()
    [quantize] = [c for c in trainer.callbacks if isinstance(c, Quantize)]
    assert state.interrupted and state.step == 3
    assert quantize.quantized is None and state.compression is None
    assert not (tmp_path / "quantized_model.pt").exists()
    assert any("quantize: skipped" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoints" / "step_00000003").is_dir()  # what the resumed run takes


def _composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        return validate(compose("train", overrides=overrides))


MNIST1D = {"input_shape": (1, 40), "num_classes": 10}
MNIST1D_STEPS_PER_EPOCH = 56  # 3,600 training signals in batches of 64


@pytest.mark.parametrize(
    ("preset", "pruning", "mode"),
    [
        ("mnist1d_cnn_compress", "pruning_gradual", "static"),
        ("mnist1d_transformer_compress", "pruning_gradual", "dynamic"),
        ("[mnist1d_cnn,compress_only]", "pruning", "static"),
    ],
)
def test_compression_presets_plan_fits_their_run(preset, pruning, mode):
    cfg = _composed([f"experiment={preset}"])
    model = build(cfg.model, "model", cfg.allowed_targets, **MNIST1D)
    callbacks = {k: build(v, k, cfg.allowed_targets) for k, v in cfg.callbacks.items()}
    steps = cfg.max_epochs * MNIST1D_STEPS_PER_EPOCH
    plan = callbacks[pruning].plan(steps, MNIST1D_STEPS_PER_EPOCH)
    assert plan["end"] == steps - callbacks[pruning].finetune_epochs * MNIST1D_STEPS_PER_EPOCH
    assert callbacks["quantize"].mode == mode
    callbacks["quantize"].check_model(model)  # the mode has layers to quantize in this model
    assert prunable_layers(model, callbacks[pruning].exclude)
    if preset.startswith("["):  # compress_only: every epoch fine-tunes, from the first step
        assert plan["start"] == 0
        assert (
            _composed([f"experiment={preset}", "max_epochs=0"]).callbacks["pruning"][
                "finetune_epochs"
            ]
            == 0
        )
