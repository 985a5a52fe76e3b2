"""Models a user would prune structurally (a residual CNN, attention models), and the trainer
config of the pruning tests (`pruning_config`): built without Hydra, as `tests/helpers.py` does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig

PRUNING = "trainer.callbacks.pruning.Pruning"
FAST_ROWS = {"latency_batches": [1, 8], "latency_budget_s": 0.1, "compiled_latency": False}


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU (He et al. 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet1d(nn.Module):
    """A stem conv, two residual blocks, global average pooling and a linear head."""

    def __init__(self, *, input_shape: Sequence[int], num_classes: int, channels: int = 8) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.stem = nn.Conv1d(self.input_shape[0], channels, 3, padding=1)
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(-1))


class AttentionClassifier(nn.Module):
    """Features -> Linear -> nn.MultiheadAttention over the sequence -> ReLU -> mean -> head."""

    def __init__(
        self, *, input_shape: Sequence[int], num_classes: int, dim: int = 16, heads: int = 4
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)  # (tokens, features)
        self.embed = nn.Linear(self.input_shape[-1], dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(F.relu(a).mean(1))


class FusedHeads(nn.Module):
    """Attention with one fused qkv projection split by its own `num_heads`: Torch-Pruning sees no
    head structure in it, so its channels cannot be pruned exactly."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.out(y)


class FusedAttentionClassifier(nn.Module):
    def __init__(self, *, input_shape: Sequence[int], num_classes: int, dim: int = 16) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.embed = nn.Linear(self.input_shape[-1], dim)
        self.attn = FusedHeads(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x)).mean(1))


def pruning_config(
    tmp_path: Path, pruning: dict[str, Any], input_shape: Sequence[int] = (64,), **top: Any
) -> TrainConfig:
    """A small CPU run of the synthetic data with `pruning` as its only callback."""
    dataset = {"_target_": "trainer.data.datasets.synthetic", "num_samples": 512}
    fields: dict[str, Any] = {
        "data": DataConfig(
            dataset={**dataset, "input_shape": list(input_shape)},
            batch_size=32,
            eval_batch_size=128,
        ),
        "model": {"_target_": "trainer.models.MLP"},
        "optim": {"_target_": "torch.optim.AdamW", "lr": 3e-3},
        "schedule": None,
        "parallel": ParallelConfig(),
        "callbacks": {"pruning": {"_target_": PRUNING, **FAST_ROWS, **pruning}},
        "logger": {},
        "checkpoint": CheckpointConfig(save_final=False),
        "device": "cpu",
        "max_epochs": 4,
        "log_every_steps": 4,
        "test_after_fit": False,
        "allowed_targets": ["trainer.", "torch.optim.", "torch.nn.", "tests."],
    }
    fields.update(top)
    return TrainConfig(**fields)
