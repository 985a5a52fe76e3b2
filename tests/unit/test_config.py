"""The config schema and `validate()`: real Hydra composition of `recipes/`, no training.

Every rejected config must fail before anything is built, with a `ConfigError` whose message names
the offending key. The CLI side of this (exit code 2, one line on stderr) is in
tests/integration/test_cli.py.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from trainer.cli import recipes_dir  # importing it registers `train_schema` and `${run_id:}`
from trainer.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ParallelConfig,
    TrainConfig,
    validate,
)
from trainer.targets import _matches, check_target

ALLOWED = ("trainer.", "torch.optim.", "torch.nn.")


def compose_train(overrides: Sequence[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def rejection(overrides: Sequence[str]) -> str:
    """The message of the ConfigError that validate() raises for the composed `overrides`."""
    cfg = compose_train(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return str(info.value)


# --------------------------------------------------------------------------- the valid default


def test_default_config_validates_to_typed_train_config():
    typed = validate(compose_train())

    assert isinstance(typed, TrainConfig)
    assert isinstance(typed.data, DataConfig)
    assert isinstance(typed.parallel, ParallelConfig)
    assert isinstance(typed.checkpoint, CheckpointConfig)
    # train.yaml's defaults list: digits + CNN + AdamW + warm-up cosine, one process.
    assert typed.data.dataset["_target_"] == "trainer.data.datasets.digits"
    assert typed.data.batch_size == 32
    assert typed.model["_target_"] == "trainer.models.CNN"
    assert typed.model["channels"] == [32, 64]  # a plain list, not a ListConfig
    assert type(typed.model["channels"]) is list
    assert typed.optim["_target_"] == "torch.optim.AdamW"
    assert typed.optim["lr"] == pytest.approx(3e-3)
    assert typed.schedule is not None
    assert typed.schedule["_target_"] == "trainer.callbacks.lr_schedule.WarmupCosine"
    assert typed.parallel.strategy == "none"
    assert set(typed.logger) == {"tensorboard", "jsonl"}  # wandb is opt-in: +logger=wandb
    assert set(typed.callbacks) == {"progress"}
    # train.yaml's own values, then the schema's defaults for what train.yaml leaves out.
    assert typed.seed == 0
    assert typed.device == "auto"
    assert typed.precision == "fp32"
    assert typed.max_epochs == 15
    assert typed.max_steps == -1
    assert typed.grad_accum_steps == 1
    assert typed.grad_clip == pytest.approx(1.0)
    assert typed.resume is None
    assert typed.test_after_fit is True
    assert typed.checkpoint == CheckpointConfig(every_steps=0, keep_last=2, save_final=True)
    assert typed.allowed_targets == list(ALLOWED)


def test_valid_overrides_reach_the_typed_config():
    typed = validate(
        compose_train(
            ["model=mlp", "model.hidden=[8,8]", "optim=sgd", "optim.lr=0.5", "max_steps=7"]
        )
    )
    assert typed.model["_target_"] == "trainer.models.MLP"
    assert typed.model["hidden"] == [8, 8]
    assert typed.optim["_target_"] == "torch.optim.SGD"
    assert typed.optim["lr"] == pytest.approx(0.5)
    assert typed.max_steps == 7


def test_no_schedule_and_logger_entries_switched_off_are_valid():
    typed = validate(compose_train(["~schedule", "logger.tensorboard=null", "callbacks=none"]))
    assert typed.schedule is None
    assert typed.logger["tensorboard"] is None
    assert typed.callbacks == {}


def test_a_config_without_the_schema_is_refused():
    plain = OmegaConf.create({"model": {"_target_": "trainer.models.MLP"}, "max_epochs": 1})
    with pytest.raises(ConfigError, match="train schema"):
        validate(plain)


# --------------------------------------------------------------------------- rejected configs


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+foo=1"], "foo"),
        (["+data.foo=1"], "data.foo"),
        (["+checkpoint.every=5"], "checkpoint.every"),  # a typo of checkpoint.every_steps
    ],
)
def test_keys_added_with_plus_that_the_schema_lacks_are_rejected(overrides, key):
    # Composition lets `+key=value` through; validate() must refuse what the dataclass lacks.
    assert key in rejection(overrides)


@pytest.mark.parametrize(
    ("overrides", "key", "detail"),
    [
        (["optim.lr=-1"], "optim.lr", "-1"),  # "negative learning rate rejected before training"
        (["data.batch_size=0"], "data.batch_size", ">= 1"),
        (["data.eval_batch_size=0"], "data.eval_batch_size", ">= 1"),
        (["max_epochs=-1"], "max_epochs", ">= 0"),
        (["max_steps=0"], "max_steps", "-1"),
        (["grad_accum_steps=0"], "grad_accum_steps", ">= 1"),
        (["grad_clip=-0.5"], "grad_clip", ">= 0"),
        (["precision=fp8"], "precision", "fp8"),
        (["device=tpu"], "device", "tpu"),
        (["parallel.strategy=foo"], "parallel.strategy", "foo"),
        (["parallel.backend=mpi"], "parallel.backend", "mpi"),
        (["parallel.param_dtype=fp16"], "parallel.param_dtype", "fp16"),
        (["parallel.tp_degree=-1"], "parallel.tp_degree", ">= 0"),
        (["parallel.tp_degree=2"], "parallel.tp_degree", "tp and fsdp_tp only"),
        (["checkpoint.keep_last=1"], "checkpoint.keep_last", ">= 2"),
        (["checkpoint.best_mode=top"], "checkpoint.best_mode", "max or min"),
    ],
)
def test_impossible_values_are_rejected_naming_the_key(overrides, key, detail):
    message = rejection(overrides)
    assert message.startswith(f"{key}:"), message
    assert detail in message


@pytest.mark.parametrize(
    ("overrides", "key", "expected_type"),
    [
        (["model=mlp", "model.hidden=abc"], "model.hidden", "Sequence"),
        (["model=mlp", "model.hidden=3"], "model.hidden", "Sequence"),
        (["model.hidden=abc"], "model.hidden", "int"),  # the CNN's hidden is one int
        (["model.hidden=1.5"], "model.hidden", "int"),
        (["model.hidden=true"], "model.hidden", "int"),  # a bool is not an int here
        (["data.dataset.val_fraction=abc"], "data.dataset.val_fraction", "float"),
        (["optim.weight_decay=abc"], "optim.weight_decay", "float"),
    ],
)
def test_wrong_types_inside_target_nodes_are_rejected(overrides, key, expected_type):
    message = rejection(overrides)
    assert message.startswith(f"{key}: expected"), message
    assert expected_type in message


@pytest.mark.parametrize(
    ("world_size", "overrides", "ok"),
    [
        ("3", ["parallel=fsdp_tp"], False),  # tp_degree 2 cannot split a world of three
        ("4", ["parallel=fsdp_tp"], True),
        ("6", ["parallel=fsdp_tp", "parallel.tp_degree=4"], False),
        ("4", ["parallel=tp"], True),  # tp_degree 0: all ranks
        ("4", ["parallel=tp", "parallel.tp_degree=2"], False),  # tp is not 2-D
    ],
)
def test_parallel_layout_is_checked_against_the_launchers_world(
    world_size, overrides, ok, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    if ok:
        assert validate(compose_train(overrides)).parallel.strategy in ("tp", "fsdp_tp")
    else:
        assert rejection(overrides).startswith("parallel.tp_degree:")


def test_wrong_type_in_a_schema_field_fails_while_composing():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["data.batch_size=abc"])
    assert "data.batch_size" in str(info.value)


def test_unknown_key_without_plus_fails_while_composing():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["optim.lrr=1"])
    assert "lrr" in str(info.value)


def test_target_outside_the_allowlist_is_rejected():
    message = rejection(["model._target_=os.system"])
    assert message.startswith("model._target_:"), message
    assert "os.system" in message
    assert "allowed_targets" in message


def test_allowed_targets_decides_which_targets_pass():
    cfg = compose_train(["allowed_targets=[trainer.,torch.]"])
    assert validate(cfg).allowed_targets == ["trainer.", "torch."]
    message = rejection(["allowed_targets=[torch.]"])  # now trainer.models.CNN is outside
    assert message.startswith("model._target_:"), message
    assert "trainer.models.CNN" in message


def test_switching_the_target_rechecks_the_remaining_keys():
    # AdamW's betas stay behind when only the target changes: SGD takes no betas.
    message = rejection(["optim._target_=torch.optim.SGD"])
    assert message.startswith("optim.betas: unknown key for torch.optim.SGD"), message


def test_target_that_does_not_exist_is_rejected():
    message = rejection(["model._target_=trainer.models.NoSuchModel"])
    assert message.startswith("model._target_:"), message
    assert "cannot import" in message


def test_unknown_model_kwarg_names_the_key_and_lists_accepted_keys():
    message = rejection(["+model.hiden=3"])
    assert message.startswith("model.hiden:"), message
    accepted = message.split("it takes:")[1]
    for name in ("channels", "hidden", "dropout"):
        assert name in accepted
    # The arguments the trainer injects are not offered as config keys.
    assert "input_shape" not in accepted
    assert "num_classes" not in accepted


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+optim.lrr=1"], "optim.lrr"),
        (["+data.dataset.num_sample=10"], "data.dataset.num_sample"),
        (["+schedule.warmup=5"], "schedule.warmup"),
        (["+logger.jsonl.file=x.jsonl"], "logger.jsonl.file"),
        (["+callbacks.progress.every=3"], "callbacks.progress.every"),
    ],
)
def test_unknown_keys_in_every_kind_of_target_node_are_rejected(overrides, key):
    message = rejection(overrides)
    assert message.startswith(f"{key}: unknown key"), message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+model.num_classes=3"], "model.num_classes"),
        (["+optim.params=[]"], "optim.params"),
        (["+logger.jsonl.save_dir=/tmp"], "logger.jsonl.save_dir"),
    ],
)
def test_arguments_the_trainer_injects_cannot_be_set(overrides, key):
    message = rejection(overrides)
    assert message.startswith(f"{key}:"), message
    assert "set by the trainer" in message


# --------------------------------------------------------------------------- check_target


def dataset(**kwargs: Any) -> dict[str, Any]:
    return {"_target_": "trainer.data.datasets.synthetic", **kwargs}


def wandb_logger(**kwargs: Any) -> dict[str, Any]:
    return {"_target_": "trainer.loggers.wandb.WandbLogger", **kwargs}


@pytest.mark.parametrize(
    "node",
    [
        dataset(),
        dataset(num_samples=10, input_shape=[4, 4], val_fraction=0.2, seed=3),
        dataset(val_fraction=1),  # an int is a fine float
        dataset(input_shape=(4,)),  # any non-string sequence
        wandb_logger(name=None, tags=None),  # Optional[...] takes None
        wandb_logger(name="run", tags=["a", "b"]),
        {"_target_": "torch.nn.Identity", "anything": 1},  # **kwargs takes any key
        {"_target_": "torch.optim.AdamW", "lr": 1, "betas": [0.9, 0.99], "_partial_": True},
    ],
)
def test_check_target_accepts(node):
    check_target(node, "node", ALLOWED, injected=("save_dir",))


@pytest.mark.parametrize(
    ("node", "key", "fragment"),
    [
        (dataset(num_samples=10.0), "node.num_samples", "expected int, got float"),
        (dataset(num_samples=True), "node.num_samples", "expected int, got bool"),
        (dataset(num_samples="10"), "node.num_samples", "expected int, got str"),
        (dataset(val_fraction=True), "node.val_fraction", "expected float, got bool"),
        (dataset(input_shape="44"), "node.input_shape", "got str"),
        (dataset(input_shape=4), "node.input_shape", "got int"),
        (dataset(num_sample=10), "node.num_sample", "unknown key"),
        (wandb_logger(name=3), "node.name", "got int"),
        (wandb_logger(tags="a"), "node.tags", "got str"),
        (wandb_logger(save_dir="/tmp"), "node.save_dir", "set by the trainer"),
        ({"lr": 1.0}, "node", "_target_"),
        ({"_target_": "subprocess.run"}, "node._target_", "allowed"),
        ({"_target_": "trainer.nowhere.Nothing"}, "node._target_", "cannot import"),
    ],
)
def test_check_target_rejects_naming_the_key(node, key, fragment):
    with pytest.raises(ConfigError) as info:
        check_target(node, "node", ALLOWED, injected=("save_dir",))
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert fragment in message


T = TypeVar("T")


@pytest.mark.parametrize(
    ("value", "expected", "ok"),
    [
        # int vs float vs bool
        (1, int, True),
        (1.0, int, False),
        (True, int, False),
        (1, float, True),
        (1.5, float, True),
        (False, float, False),
        ("1.5", float, False),
        (True, bool, True),
        (1, bool, False),
        ("x", str, True),
        (1, str, False),
        # sequences: any non-string sequence, parametrised or not
        ([1, 2], Sequence[int], True),
        ((1, 2), Sequence[int], True),
        ([], Sequence[int], True),
        ("12", Sequence[int], False),
        (12, Sequence[int], False),
        ([1], list[int], True),
        ((1,), tuple[int, ...], True),
        ({"a": 1}, Sequence[int], False),
        ([1], typing.Sequence[int], True),
        # Optional / unions, both spellings
        (None, Optional[int], True),  # noqa: UP045 -- typing.Optional on purpose
        (3, Optional[int], True),  # noqa: UP045
        ("3", Optional[int], False),  # noqa: UP045
        (None, int, False),
        (None, int | None, True),
        (2.5, int | float, True),
        ("a", int | float, False),
        (None, type(None), True),
        (0, type(None), False),
        # what the checker leaves to the target
        (object(), Any, True),
        ("anything", T, True),
        (print, Callable[[int], int], True),
        ({"k": 1}, dict[str, int], True),
        ([1], dict[str, int], False),
    ],
)
def test_matches(value, expected, ok):
    assert _matches(value, expected) is ok


def test_restoring_best_weights_after_pruning_is_refused_in_that_order_only():
    early = "callbacks.early_stopping.restore_best_weights=true"
    message = rejection(["callbacks=[pruning,early_stopping]", early])
    assert message.startswith("callbacks.early_stopping: restores the best weights")
    assert "before callbacks.pruning (it would undo" in message
    validate(compose_train(["callbacks=[early_stopping,pruning]", early]))
    validate(compose_train(["callbacks=[pruning,early_stopping]"]))  # nothing restored: fine
