"""Config -> the parts of a run: data, model, optimizer, callbacks, loggers, the Trainer."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from trainer.allocator import keep_freed_memory
from trainer.callbacks.base import Callback
from trainer.checkpoint import Checkpointer
from trainer.config import TrainConfig, build
from trainer.data.datasets import DataSplits
from trainer.data.loaders import eval_loader, train_loader
from trainer.distributed.env import DistEnv
from trainer.distributed.parallelize import build_mesh, parallelize
from trainer.loggers.base import Logger, LoggerGroup
from trainer.loop import Trainer
from trainer.throughput import train_flops_per_sample


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)


def build_data(cfg: TrainConfig) -> DataSplits:
    return build(cfg.data.dataset, "data.dataset", cfg.allowed_targets)


def build_model(cfg: TrainConfig, splits: DataSplits) -> torch.nn.Module:
    return build(
        cfg.model,
        "model",
        cfg.allowed_targets,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
    )


def build_callbacks(cfg: TrainConfig, run_dir: Path) -> list[Callback]:
    """The LR schedule first, then `callbacks` in config order (a null entry switches one off).
    A callback that takes a `run_dir` argument (to write reports) is given the run folder."""
    nodes = [("schedule", cfg.schedule)] + [(f"callbacks.{k}", v) for k, v in cfg.callbacks.items()]
    return [
        build(node, key, cfg.allowed_targets, run_dir=str(run_dir))
        for key, node in nodes
        if node is not None
    ]


def build_loggers(cfg: TrainConfig, env: DistEnv, run_dir: Path) -> Logger:
    if not env.is_global_zero:
        return Logger()  # only rank zero writes logs
    # Started in the group's background thread, so that training does not wait for them.
    return LoggerGroup(
        {
            f"logger.{name}": partial(
                build, node, f"logger.{name}", cfg.allowed_targets, save_dir=str(run_dir)
            )
            for name, node in cfg.logger.items()
            if node is not None
        }
    )


def build_trainer(cfg: TrainConfig, env: DistEnv, run_dir: Path) -> tuple[Trainer, dict[str, int]]:
    """Returns the trainer and facts about the model for the summary: parameter count, training
    FLOPs per sample and tokens per sample (1 for classification)."""
    seed_everything(cfg.seed, cfg.deterministic)
    if cfg.keep_freed_memory and env.device.type == "cpu":
        keep_freed_memory()
    splits = build_data(cfg)
    model = build_model(cfg, splits)
    inputs, targets = default_collate([splits.train[0], splits.train[1]])
    facts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_sample": train_flops_per_sample(model, inputs, targets),
        "tokens_per_sample": targets[0].numel(),
    }
    mesh, env = build_mesh(cfg.parallel, env)
    model = parallelize(model, cfg.parallel, env, mesh)
    if cfg.compile:
        model = torch.compile(model)
    # The optimizer is built after wrapping so that it holds the wrapped (possibly sharded) params.
    optimizer = build(cfg.optim, "optim", cfg.allowed_targets, params=model.parameters())
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        train_loader=train_loader(splits.train, cfg.data, env, cfg.seed),
        val_loader=eval_loader(splits.val, cfg.data, env) if len(splits.val) else None,
        test_loader=eval_loader(splits.test, cfg.data, env) if len(splits.test) else None,
        cfg=cfg,
        env=env,
        callbacks=build_callbacks(cfg, run_dir),
        logger=build_loggers(cfg, env, run_dir),
        checkpointer=Checkpointer(run_dir, cfg.checkpoint, cfg.resume),
    )
    return trainer, facts
