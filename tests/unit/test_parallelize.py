"""Single-process pieces of `trainer/distributed/parallelize.py`: activation checkpointing, the
tensor-parallel plans and what they refuse, the checks on parallel degrees, and every
`parallel=` preset run as one process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from tests.helpers import ENV, StepLosses, make_config
from trainer.build import build_trainer
from trainer.cli import recipes_dir  # importing it registers `train_schema` and `${run_id:}`
from trainer.config import ConfigError, ParallelConfig, validate
from trainer.distributed.parallelize import (
    apply_activation_checkpointing,
    parallelize,
    tensor_parallel_plan,
)
from trainer.models import CNN, MLP, GRUClassifier, TinyGPT, TransformerClassifier


def test_activation_checkpointing_gives_the_same_gradients_and_recomputes():
    torch.manual_seed(0)
    model = TransformerClassifier(input_shape=(1, 8, 8), num_classes=10, dim=32, depth=2, heads=4)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    forwards = []
    block = checkpointed.blocks[0]._checkpoint_wrapped_module
    block.attn.q.register_forward_hook(lambda *_: forwards.append(1))
    for m in (model, checkpointed):
        F.cross_entropy(m(inputs), targets).backward()
    assert len(forwards) == 2, "the block should run again in backward"
    assert model.state_dict().keys() == checkpointed.state_dict().keys()  # checkpoints still load
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_activation_checkpointing_needs_blocks():
    with pytest.raises(ValueError, match="activation_checkpointing.*MLP"):
        apply_activation_checkpointing(MLP(input_shape=(8,), num_classes=2))


def test_tensor_parallel_plans():
    gpt = TinyGPT(input_shape=(16,), num_classes=32, dim=32, depth=2, heads=4)
    plan = tensor_parallel_plan(gpt)
    assert len(plan) == 2 * 6
    assert isinstance(plan["blocks.1.attn.q"], ColwiseParallel)
    assert isinstance(plan["blocks.1.attn.o"], RowwiseParallel)
    assert isinstance(plan["blocks.0.mlp.fc2"], RowwiseParallel)
    mlp_plan = tensor_parallel_plan(MLP(input_shape=(8,), num_classes=2, hidden=(16, 16)))
    assert {k: type(v) for k, v in mlp_plan.items()} == {
        "net.1": ColwiseParallel,
        "net.4": RowwiseParallel,
    }  # the head (net.7) stays replicated
    cnn_plan = tensor_parallel_plan(CNN(input_shape=(1, 8, 8), num_classes=10))
    assert {k: type(v) for k, v in cnn_plan.items()} == {
        "classifier.1": ColwiseParallel,
        "classifier.4": RowwiseParallel,
    }
    gru_plan = tensor_parallel_plan(GRUClassifier(input_shape=(1, 8, 8), num_classes=10))
    assert {k: type(v) for k, v in gru_plan.items()} == {"head": ColwiseParallel}
    convnet = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="Sequential has no tensor-parallel plan"):
        tensor_parallel_plan(convnet)


@pytest.mark.parametrize(
    ("strategy", "tp", "world", "expected"),
    [
        ("ddp", 0, 4, (4, 1)),
        ("fsdp", 1, 2, (2, 1)),
        ("tp", 0, 2, (1, 2)),
        ("fsdp_tp", 2, 8, (4, 2)),
    ],
)
def test_degrees_multiply_to_the_world(strategy, tp, world, expected):
    assert ParallelConfig(strategy=strategy, tp_degree=tp).degrees(world) == expected


@pytest.mark.parametrize(
    ("strategy", "tp", "world", "message"),
    [
        ("fsdp_tp", 3, 4, "3 does not divide the world size 4"),
        ("tp", 2, 4, "shards over all 4 ranks"),
        ("ddp", 2, 4, "applies to tp and fsdp_tp only"),
    ],
)
def test_impossible_degrees_name_the_key(strategy, tp, world, message):
    with pytest.raises(ConfigError, match=f"parallel.tp_degree: .*{message}"):
        ParallelConfig(strategy=strategy, tp_degree=tp).degrees(world)


def test_one_process_strategy_refuses_a_bigger_world():
    with pytest.raises(ConfigError, match="parallel.strategy: none runs one process, but 2"):
        ParallelConfig(strategy="none").degrees(2)


# --------------------------------------------------------------------------- what tp refuses


def test_tensor_parallel_refuses_a_norm_between_the_linears_it_pairs():
    # fc1's output features are split over the ranks: BatchNorm would see 24 of its 48.
    model = nn.Sequential(nn.Linear(8, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 4))
    with pytest.raises(ConfigError) as info:
        tensor_parallel_plan(model)
    message = str(info.value)
    assert message.startswith(
        "parallel.strategy: Sequential's layer 1 (BatchNorm1d) sits between 0 and 3"
    )
    # Elementwise modules between the pair are fine.
    plan = tensor_parallel_plan(nn.Sequential(nn.Linear(8, 48), nn.GELU(), nn.Linear(48, 4)))
    assert {k: type(v) for k, v in plan.items()} == {"0": ColwiseParallel, "2": RowwiseParallel}


def test_a_user_model_tp_cannot_shard_is_refused_in_one_process_too(tmp_path):
    cfg = make_config(
        model={"_target_": "tests.user_models.BatchNormMLP"},
        parallel=ParallelConfig(strategy="tp"),
        allowed_targets=["trainer.", "torch.optim.", "tests."],
    )
    with pytest.raises(
        ConfigError, match=r"^parallel.strategy: BatchNormMLP's layer bn \(BatchNorm1d\)"
    ):
        build_trainer(cfg, ENV, tmp_path)


# --------------------------------------------------------------------------- one process


def test_every_parallel_preset_runs_as_one_process(tmp_path, monkeypatch):
    """The same recipe runs unchanged in one process: the plain model, the same losses as
    parallel=none; a tensor-parallel degree one process cannot hold warns, naming it."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    small = ["model=transformer", "model.dim=16", "model.depth=1", "model.heads=2"]
    small += ["data=synthetic", "data.dataset.num_samples=160", "data.dataset.input_shape=[4,4]"]
    small += ["data.batch_size=16", "max_steps=3", "log_every_steps=1", "logger=none"]
    small += ["callbacks=none", "checkpoint.save_final=false", "device=cpu"]
    presets = sorted(p.stem for p in (recipes_dir() / "parallel").glob("*.yaml"))
    assert presets == ["ddp", "fsdp", "fsdp_tp", "none", "tp"]
    losses = {}
    for preset in presets:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*small, f"parallel={preset}"])
        if preset == "fsdp_tp":
            with pytest.warns(UserWarning, match="parallel.tp_degree: 2 needs 2 ranks"):
                typed = validate(cfg)
        else:
            typed = validate(cfg)
        trainer, _ = build_trainer(typed, ENV, tmp_path / preset)
        assert type(trainer.model) is TransformerClassifier  # nothing wrapped
        steps = StepLosses()
        trainer.callbacks.append(steps)
        trainer.fit()
        losses[preset] = steps.losses
    assert len(losses["none"]) == 3
    assert all(run == losses["none"] for run in losses.values()), losses


def test_activation_checkpointing_comes_after_the_tensor_parallel_plan(tmp_path):
    """Checkpoint-wrapped blocks hide their submodules from `parallelize_module`'s names:
    q/k/v must be sharded before the blocks are wrapped (here over a real one-rank group)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        model = TransformerClassifier(input_shape=(4, 4), num_classes=3, dim=8, depth=1, heads=2)
        cfg = ParallelConfig(strategy="tp", activation_checkpointing=True)
        parallelize(model, cfg, ENV, mesh)
        block = model.blocks[0]
        assert hasattr(block, "_checkpoint_wrapped_module")
        assert isinstance(block._checkpoint_wrapped_module.attn.q.weight, DTensor)
        assert isinstance(block._checkpoint_wrapped_module.mlp.fc2.weight, DTensor)
    finally:
        dist.destroy_process_group()
