"""Single-process pieces of `trainer/distributed/parallelize.py`: activation checkpointing, the
tensor-parallel plans, and the checks on parallel degrees."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from trainer.config import ConfigError, ParallelConfig
from trainer.distributed.parallelize import apply_activation_checkpointing, tensor_parallel_plan
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
