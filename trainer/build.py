"""Config -> the parts of a run: data, model, optimizer, callbacks, loggers, the Trainer."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.data import DataLoader, default_collate

from trainer.allocator import keep_freed_memory
from trainer.callbacks.base import Callback
from trainer.checkpoint import Checkpointer
from trainer.config import TrainConfig
from trainer.data.datasets import DataSplits, as_splits
from trainer.data.loaders import eval_loader, train_loader
from trainer.distributed.env import DistEnv
from trainer.distributed.parallelize import build_mesh, parallelize
from trainer.errors import ConfigError
from trainer.init_weights import load_initial_weights
from trainer.loggers.base import Logger, LoggerGroup
from trainer.loop import Trainer
from trainer.losses import Loss, check_loss, flat_cross_entropy
from trainer.state import TrainState
from trainer.targets import build
from trainer.throughput import train_flops_per_sample
from trainer.validation import build_callbacks, check_monitors


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)


def build_data(cfg: TrainConfig) -> DataSplits:
    built = build(cfg.data.dataset, "data.dataset", cfg.allowed_targets)
    return as_splits(built, "data.dataset")


def build_model(cfg: TrainConfig, splits: DataSplits) -> torch.nn.Module:
    return build(
        cfg.model,
        "model",
        cfg.allowed_targets,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
    )


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


def build_trainer(
    cfg: TrainConfig,
    env: DistEnv,
    run_dir: Path,
    model: torch.nn.Module | None = None,
    splits: DataSplits | None = None,
) -> tuple[Trainer, dict[str, int]]:
    """Returns the trainer and facts about the model for the summary: parameter count, training
    FLOPs per sample and tokens per sample (1 for classification). A `model` or `splits` given
    (built by the caller) stands in for the config's."""
    seed_everything(cfg.seed, cfg.deterministic)
    if cfg.keep_freed_memory and env.device.type == "cpu":
        keep_freed_memory()
    splits = splits or build_data(cfg)
    model = (model if model is not None else build_model(cfg, splits)).to(env.device)
    if cfg.init_from is not None:  # on the bare model: DDP replicates it, FSDP2 shards it after
        load_initial_weights(model, cfg.init_from, env)
    inputs, targets = default_collate([splits.train[0], splits.train[1]])
    check_model_fits(model, cfg, inputs[:1].to(env.device), targets[:1].to(env.device))
    facts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_sample": train_flops_per_sample(model, inputs, targets),
        "tokens_per_sample": targets[0].numel(),
    }
    bare_model = model  # wrapping keeps its modules: callbacks look them up by name
    callbacks = build_callbacks(cfg, str(run_dir))
    check_callbacks_fit(bare_model, callbacks)
    prepare_model_for_callbacks(bare_model, callbacks)
    mesh, env = build_mesh(cfg.parallel, env)
    model = parallelize(model, cfg.parallel, env, mesh)
    if cfg.compile:
        model = torch.compile(model)
    # The optimizer is built after wrapping so that it holds the wrapped (possibly sharded) params.
    optimizer = build(cfg.optim, "optim", cfg.allowed_targets, params=model.parameters())
    train = train_loader(splits.train, cfg.data, env, cfg.seed)
    check_batch_fits(train, len(splits.train), cfg, env)
    # validate() assumed a validation split; the data may have none.
    check_monitors(
        cfg,
        callbacks,
        validates=cfg.val_every_epochs > 0 and len(splits.val) > 0,
        sequences=facts["tokens_per_sample"] > 1,
    )
    loss = build_loss(cfg, env, mesh, splits)  # after the cheap checks: it may load a teacher
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        train_loader=train,
        val_loader=eval_loader(splits.val, cfg.data, env) if len(splits.val) else None,
        test_loader=eval_loader(splits.test, cfg.data, env) if len(splits.test) else None,
        cfg=cfg,
        env=env,
        callbacks=[callback for _, callback in callbacks],
        logger=build_loggers(cfg, env, run_dir),
        checkpointer=Checkpointer(run_dir, cfg.checkpoint, cfg.resume),
        loss=loss,
    )
    check_callback_plans(trainer.state, callbacks)
    return trainer, facts


def check_callback_plans(state: TrainState, callbacks: list[tuple[str, Callback]]) -> None:
    """A callback with phases at the end of the fit (`plan(max_steps, steps_per_epoch)`: pruning's
    and quantization-aware training's epochs) refuses a fit too short for them here, before any
    step runs, rather than at fit start."""
    for _, callback in callbacks:
        plan = getattr(callback, "plan", None)
        if not callable(plan):  # (low rank's `plan` is its {layer: rank} once it has one)
            continue
        try:
            plan(state.max_steps, state.steps_per_epoch)
        except ValueError as err:
            message = str(err)
            raise ConfigError(
                message if message.startswith("callbacks.") else f"callbacks.{message}"
            ) from None


def build_loss(cfg: TrainConfig, env: DistEnv, mesh: DeviceMesh | None, splits: DataSplits) -> Loss:
    """The loss a step minimizes, set up on every rank with the run's parts (a distillation
    loss builds, shards and loads its teacher here, before the first step)."""
    check_loss(cfg.loss, cfg.allowed_targets)
    loss = build(cfg.loss, "loss", cfg.allowed_targets)
    loss.setup(cfg, env, mesh, splits)
    return loss


def check_model_fits(
    model: torch.nn.Module, cfg: TrainConfig, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    """One sample through the bare model and the loss: a model that does not fit the data (a
    vector model on token sequences, a forward that fails) is refused here in one line, not
    deep inside the first step or the wrappers."""
    was_training = model.training
    model.eval()  # no dropout drawn, no BatchNorm statistics moved, and a batch of one is fine
    try:
        with torch.no_grad():
            flat_cross_entropy(model(inputs), targets)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"model: {_named(cfg.model)} does not fit the data of "
            f"{_named(cfg.data.dataset)}: one sample of shape {tuple(inputs.shape)} "
            f"({inputs.dtype}) with targets of shape {tuple(targets.shape)} gave: {first_line}"
        ) from None
    finally:
        model.train(was_training)


def _named(node: dict) -> str:
    """What a node builds: its target, or the type of the object handed in (trainer.api)."""
    return node.get("type") or node["_target_"]


def check_callbacks_fit(model: torch.nn.Module, callbacks: list[tuple[str, Callback]]) -> None:
    """A callback with a `check_model(model)` method (e.g. a schedule that needs dropout or
    drop-path modules) refuses a model it cannot work on here, as a config error naming it."""
    for key, callback in callbacks:
        check = getattr(callback, "check_model", None)
        if check is not None:
            try:
                check(model)
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None


def prepare_model_for_callbacks(
    model: torch.nn.Module, callbacks: list[tuple[str, Callback]]
) -> None:
    """A callback with a `prepare_model(model)` method changes the bare model's modules here,
    before DDP / FSDP2 wrap it and the optimizer and a resumed checkpoint see its parameters
    (e.g. quantization-aware training swaps in fake-quantized layers that keep the parameters'
    names, so checkpoints, sharding and the optimizer work on them unchanged)."""
    for _, callback in callbacks:
        prepare = getattr(callback, "prepare_model", None)
        if prepare is not None:
            prepare(model)


def check_batch_fits(loader: DataLoader, samples: int, cfg: TrainConfig, env: DistEnv) -> None:
    """Refuse a training loader that gives no batch: no step would ever run."""
    if len(loader):
        return
    share = samples // env.dp_size
    raise ConfigError(
        f"data.batch_size: {cfg.data.batch_size} is more than the {share} training samples "
        f"each of {env.dp_size} data-parallel rank(s) reads, and data.drop_last drops the short "
        f"batch, so no step would run; use data.batch_size <= {share}"
        if share
        else f"data.batch_size: the {samples} training samples are fewer than the "
        f"{env.dp_size} data-parallel ranks"
    )
