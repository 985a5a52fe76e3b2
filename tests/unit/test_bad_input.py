"""Bad input is refused with one `ConfigError` naming the key, before anything trains: by
`validate()` where the config alone decides (monitors, devices, the callbacks' own argument
checks), otherwise by `build_trainer` before the first step (the data's and the model's
arguments, a batch larger than the split, a model that does not fit the data). Two runs of the
real command line check the one line and exit code 2."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from tests.conftest import run_cli
from tests.helpers import DATASET, ENV, make_config
from trainer.build import build_trainer, check_model_fits
from trainer.callbacks.base import Callback
from trainer.cli import recipes_dir  # importing it registers `train_schema` and `${run_id:}`
from trainer.config import ConfigError, ParallelConfig, validate
from trainer.data.datasets import synthetic
from trainer.metrics import fit_metrics
from trainer.state import TrainState

USER_TARGETS = ["trainer.", "torch.optim.", "torch.nn.", "tests."]


def rejected_by_validate(overrides: Sequence[str]) -> str:
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=1)
    return str(info.value)


def rejected_by_build(tmp_path: Path, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build_trainer(make_config(**overrides), ENV, tmp_path)
    return str(info.value)


# ------------------------------------------------------------------------------- monitors


class MetricNames(Callback):
    """Every name in `state.metrics` at each hook of the fit."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def _note(self, state: TrainState) -> None:
        self.seen |= set(state.metrics)

    on_step_end = on_eval_end = on_epoch_end = on_fit_end = _note


@pytest.mark.parametrize("val_every_epochs", [1, 0])
def test_the_metrics_a_fit_logs_are_the_ones_monitors_are_checked_against(
    tmp_path, val_every_epochs
):
    names = MetricNames()
    trainer, _ = build_trainer(make_config(val_every_epochs=val_every_epochs), ENV, tmp_path)
    trainer.callbacks.append(names)
    trainer.fit()
    listed = fit_metrics(validates=val_every_epochs > 0, skips=False, sequences=False)
    # "lr/" is a prefix: per-group rates appear only with several parameter groups.
    assert names.seen == {n for n in listed if not n.endswith("/")}
    assert not any(n.startswith("test/") for n in names.seen)  # the test split comes after fit


@pytest.mark.parametrize(
    ("overrides", "key", "why"),
    [
        (["checkpoint.best_monitor=val/acc"], "checkpoint.best_monitor", "not a metric"),
        (
            ["callbacks=[early_stopping]", "callbacks.early_stopping.monitor=val/acc"],
            "callbacks.early_stopping.monitor",
            "not a metric",
        ),
        (["schedule=plateau", "schedule.monitor=train/los"], "schedule.monitor", "not a metric"),
        (["checkpoint.best_monitor=test/accuracy"], "checkpoint.best_monitor", "after the fit"),
        # early stopping's default monitor is val/loss
        (
            ["callbacks=[early_stopping]", "val_every_epochs=0"],
            "callbacks.early_stopping.monitor",
            "needs validation",
        ),
    ],
)
def test_a_monitor_the_fit_never_logs_is_refused(overrides, key, why):
    message = rejected_by_validate(overrides)
    assert message.startswith(f"{key}: "), message
    assert why in message
    assert "valid monitors: train/loss" in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["checkpoint.best_monitor=val/accuracy"],
        ["checkpoint.best_monitor=train/loss", "val_every_epochs=0"],
        ["callbacks=[early_stopping]", "callbacks.early_stopping.monitor=val/accuracy"],
        # a callback's own metric: pruning logs pruning/...
        [
            "callbacks=[pruning,early_stopping]",
            "callbacks.early_stopping.monitor=pruning/sparsity",
        ],
    ],
)
def test_monitors_the_fit_logs_pass(overrides):
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        validate(compose(config_name="train", overrides=overrides), world_size=1)


def test_a_monitor_of_validation_is_refused_when_the_data_has_no_val_split(tmp_path):
    # The config validates (it cannot know the split is empty); the build refuses.
    message = rejected_by_build(
        tmp_path,
        dataset={"_target_": "tests.user_models.no_val_split"},
        checkpoint={"best_monitor": "val/loss"},
        allowed_targets=USER_TARGETS,
    )
    assert message.startswith("checkpoint.best_monitor: 'val/loss' needs validation"), message


# ------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["device=cpu", "precision=fp16"], "precision"),
        (["device=cpu", "parallel=fsdp", "parallel.cpu_offload=true"], "parallel.cpu_offload"),
        (["device=cpu", "parallel=ddp", "parallel.sync_batchnorm=true"], "parallel.sync_batchnorm"),
        (["loss=distill", "loss.alpha=2"], "loss.alpha"),
        (["parallel=ddp", "parallel.cpu_offload=true"], "parallel.cpu_offload"),
        (["callbacks=[pruning]", "callbacks.pruning.sparsity=1.5"], "callbacks.pruning.sparsity"),
        (
            ["callbacks=[early_stopping]", "callbacks.early_stopping.patience=-1"],
            "callbacks.early_stopping.patience",
        ),
        (["schedule=step", "schedule.interval=hour"], "schedule.interval"),
    ],
)
def test_values_the_config_alone_rules_out_are_refused_by_validate(overrides, key):
    assert rejected_by_validate(overrides).startswith(f"{key}: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_cuda_without_cuda_is_refused_by_validate():
    assert rejected_by_validate(["device=cuda"]).startswith("device: cuda was asked for")


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        ({"dataset": {"val_fraction": 1.5}}, "data.dataset.val_fraction: must be in (0, 1)"),
        ({"model": {"dropout": 2.0}}, "model: dropout probability"),
        ({"optim": {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": -1.0}}, "optim: "),
        (
            {
                "model": {"_target_": "trainer.models.MLP"},
                "parallel": ParallelConfig(activation_checkpointing=True),
            },
            "parallel.activation_checkpointing: MLP has no `blocks`",
        ),
    ],
)
def test_values_the_data_or_model_rule_out_are_refused_while_building(tmp_path, overrides, start):
    message = rejected_by_build(tmp_path, **overrides)
    assert message.startswith(start), message


def test_a_schedule_for_modules_the_model_lacks_is_refused_while_building(tmp_path):
    # The test MLP has neither dropout modules (dropout=0 builds none) nor drop-path ones.
    schedule = {"_target_": "trainer.callbacks.stochastic_depth.StochasticDepthSchedule"}
    schedule |= {"schedule": "early", "start_value": 0.1, "until_step": 4}
    message = rejected_by_build(tmp_path, callbacks={"stochastic_depth": schedule})
    assert message.startswith("callbacks.stochastic_depth: StochasticDepthSchedule: no DropPath")
    assert "\n" not in message


def test_a_batch_larger_than_a_ranks_share_of_the_split_is_refused(tmp_path):
    train = len(synthetic(**{k: v for k, v in DATASET.items() if k != "_target_"}).train)
    message = rejected_by_build(tmp_path, data={"batch_size": train + 1})
    assert message.startswith(f"data.batch_size: {train + 1} is more than the {train} "), message
    # Without drop_last the short batch is a step: the same batch size trains.
    build_trainer(make_config(data={"batch_size": train + 1, "drop_last": False}), ENV, tmp_path)


@pytest.mark.parametrize(
    ("model", "detail"),
    [
        # token ids into an embedding of a float-vector model: integer inputs are expected
        ({"_target_": "trainer.models.TinyGPT", "dim": 8, "depth": 1, "heads": 2}, "gave: "),
        ({"_target_": "tests.user_models.FixedWidth"}, "shapes cannot be multiplied"),
    ],
)
def test_a_model_that_does_not_fit_the_data_is_refused_naming_the_shapes(tmp_path, model, detail):
    message = rejected_by_build(tmp_path, model=model, allowed_targets=USER_TARGETS)
    assert message.startswith(f"model: {model['_target_']} does not fit the data of "), message
    assert "one sample of shape (1, 8) (torch.float32)" in message
    assert detail in message
    assert "\n" not in message


def test_the_fit_check_leaves_the_model_and_the_rng_as_they_were():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    model.train()
    inputs, targets = torch.randn(1, 8), torch.tensor([1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_model_fits(model, make_config(), inputs, targets)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # BatchNorm's statistics unmoved


# ------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["checkpoint.best_monitor=val/acc"], "checkpoint.best_monitor: 'val/acc'"),  # validate
        (
            ["model=mlp", "data=text", "data.dataset.max_bytes=20000"],
            "model: trainer.models.MLP does not fit",
        ),
    ],
    ids=["validate", "build"],
)
def test_the_command_line_prints_one_line_and_exits_2(tmp_path, args, start):
    run_dir = tmp_path / "run"
    proc = run_cli([*args, "logger=none", "max_epochs=1", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith(f"hooktrain: config error: {start}")
    assert not run_dir.exists()  # a refused command leaves no run folder behind


def test_a_refused_command_leaves_a_folder_it_found_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    proc = run_cli(["model.dropout=2", "logger=none", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (run_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("node", "key"),
    [
        ({"_target_": "trainer.callbacks.pruning.Pruning", "finetune_epochs": 3}, "pruning"),
        (
            {"_target_": "trainer.callbacks.qat.QuantizationAwareTraining", "epochs": 3},
            "qat",
        ),
    ],
    ids=["pruning", "qat"],
)
def test_end_phases_longer_than_the_fit_are_refused_when_built(tmp_path, node, key):
    # Before: refused only at fit start, after the loggers and the process group had started.
    cfg = make_config(callbacks={key: node}, max_epochs=2)
    with pytest.raises(ConfigError, match=rf"^callbacks\.{key}\.\w*epochs: 3 .* exceed the 16"):
        build_trainer(cfg, ENV, tmp_path)
