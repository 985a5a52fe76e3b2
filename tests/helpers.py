"""Small shared builders for the unit tests of the training loop, schedules and checkpoints.

Everything here builds real parts (config dataclasses, `build_trainer`, torch's own samplers); the
tests compare what the trainer does with references computed by hand in the same test.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig
from trainer.distributed.env import DistEnv
from trainer.loop import Trainer
from trainer.state import TrainState

CPU = torch.device("cpu")
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)

# 320 samples -> 256 train, 32 val, 32 test (synthetic() rounds 10% of 320 to 32).
DATASET: dict[str, Any] = {
    "_target_": "trainer.data.datasets.synthetic",
    "num_samples": 320,
    "input_shape": [8],
    "num_classes": 4,
    "seed": 0,
}
MODEL: dict[str, Any] = {"_target_": "trainer.models.MLP", "hidden": [16], "dropout": 0.0}
SGD: dict[str, Any] = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}
ADAMW: dict[str, Any] = {"_target_": "torch.optim.AdamW", "lr": 1e-2, "weight_decay": 0.01}
CONSTANT: dict[str, Any] = {"_target_": "trainer.callbacks.lr_schedule.Constant"}


def make_config(
    *,
    data: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    checkpoint: dict[str, Any] | None = None,
    **top: Any,
) -> TrainConfig:
    """A `TrainConfig` built from dataclasses (no Hydra): synthetic data, a tiny MLP, SGD, no
    schedule, no loggers, no callbacks, nothing saved. Dict arguments update the defaults of
    their section (``model={"dropout": 0.1}``); other keywords set top-level fields."""
    data_kw = {"batch_size": 32, "eval_batch_size": 64, "shuffle": True, "drop_last": True}
    data_kw.update(data or {})
    data_kw["dataset"] = _node(DATASET, dataset)
    ckpt_kw = {"every_steps": 0, "save_final": False, "keep_last": 2}
    ckpt_kw.update(checkpoint or {})
    fields: dict[str, Any] = {
        "data": DataConfig(**data_kw),
        "model": _node(MODEL, model),
        "optim": dict(optim or SGD),
        "schedule": None,
        "parallel": ParallelConfig(),
        "callbacks": {},
        "logger": {},
        "checkpoint": CheckpointConfig(**ckpt_kw),
        "device": "cpu",
        "max_epochs": 2,
        "grad_clip": 0.0,
        "log_every_steps": 1,
        "test_after_fit": False,
    }
    fields.update(top)
    return TrainConfig(**fields)


def _node(default: dict[str, Any], update: dict[str, Any] | None) -> dict[str, Any]:
    """`default` updated by `update`; an `update` naming another `_target_` replaces it."""
    if update and "_target_" in update:
        return dict(update)
    return {**default, **(update or {})}


def make_trainer(
    tmp_path: Path, *, callbacks: Iterable[Callback] = (), **overrides: Any
) -> Trainer:
    """`build_trainer` on `make_config(**overrides)` in run folder `tmp_path`; `callbacks` are
    appended after the configured ones (the schedule, if any, comes first)."""
    trainer, _ = build_trainer(make_config(**overrides), ENV, Path(tmp_path))
    trainer.callbacks.extend(callbacks)
    return trainer


# ------------------------------------------------------------------------------- references


def epoch_batches(
    dataset: Dataset, batch_size: int, epoch: int, seed: int, shuffle: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches of `epoch` in the order the trainer draws them, rebuilt with torch's
    own `DistributedSampler` for a world of one (incomplete last batch dropped)."""
    sampler = DistributedSampler(
        dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        xs, ys = zip(*(dataset[i] for i in idx), strict=True)
        yield torch.stack(xs), torch.stack(ys)


def reference_fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    shuffle: bool = True,
    grad_clip: float = 0.0,
) -> list[float]:
    """A plain PyTorch training loop; returns the per-step losses."""
    losses = []
    model.train()
    for epoch in range(epochs):
        for x, y in epoch_batches(dataset, batch_size, epoch, seed, shuffle):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(loss.item())
    return losses


def clone_model(trainer: Trainer) -> torch.nn.Module:
    return copy.deepcopy(trainer.model)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        if atol == 0.0:
            assert torch.equal(sa[name], sb[name]), f"{name} differs"
        else:
            torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=atol, msg=name)


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


# ------------------------------------------------------------------------------- callbacks


class StepLosses(Callback):
    """Records `state.metrics["train/loss"]` on every step where the loop logged a fresh value
    (use with log_every_steps=1 for per-step losses)."""

    def __init__(self) -> None:
        self.logged: dict[int, float] = {}

    def on_step_end(self, state: TrainState) -> None:
        if "train/loss" in state.unlogged:
            self.logged[state.step] = state.metrics["train/loss"]

    @property
    def losses(self) -> list[float]:
        return [self.logged[s] for s in sorted(self.logged)]
