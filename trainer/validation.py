"""What `validate()` checks once the config has the schema's types (trainer/config.py), before any
process group starts: the parallel degrees, the resume folder, every `_target_` node, the
devices, the callbacks' own checks of their arguments and what their monitors watch.

The checks that need the data or the model (a batch larger than the split, a model that does
not fit the data) run while building, in trainer/build.py, before anything trains. Every failure
is a `ConfigError` whose message starts with the key.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from trainer.distributed.env import pick_device
from trainer.errors import ConfigError, require
from trainer.losses import check_loss
from trainer.metrics import LOOP_PREFIXES, eval_metrics, fit_metrics
from trainer.targets import build, check_target, resolve_target

if TYPE_CHECKING:
    from trainer.config import TrainConfig


def check_run(cfg: TrainConfig, world_size: int) -> None:
    """Everything about a typed config that needs no data and no model."""
    cfg.parallel.degrees(world_size)
    if cfg.resume not in (None, "auto"):
        require(
            os.path.isdir(cfg.resume),
            "resume",
            f"no checkpoint folder at {cfg.resume!r} (use a checkpoints/step_N folder, or auto)",
        )
    allowed = tuple(cfg.allowed_targets)
    check_target(cfg.model, "model", allowed, injected=("input_shape", "num_classes"))
    check_target(cfg.data.dataset, "data.dataset", allowed)
    check_target(cfg.optim, "optim", allowed, injected=("params",))
    check_loss(cfg.loss, allowed)
    for group, nodes in (("callbacks", cfg.callbacks), ("logger", cfg.logger)):
        for name, node in nodes.items():
            require(
                node is None or isinstance(node, Mapping),
                f"{group}.{name}",
                "must be a mapping or null",
            )
    for name, node in cfg.logger.items():
        if node is not None:  # loggers start in the background while building; not here
            check_target(node, f"logger.{name}", allowed, injected=("save_dir",))
    _check_callback_order(cfg.callbacks, allowed)
    _check_devices(cfg)
    # The schedule and the callbacks are cheap to build, and their constructors check their
    # own arguments (a sparsity of 1.5): built once here, thrown away, built again for the run.
    check_monitors(cfg, build_callbacks(cfg), validates=cfg.val_every_epochs > 0)


def build_callbacks(cfg: TrainConfig, run_dir: str | None = None) -> list[tuple[str, Any]]:
    """(key, callback): the LR schedule first, then `callbacks` in config order (a null entry
    switches one off). A callback that takes a `run_dir` argument (to write reports) is given
    the run folder."""
    nodes = [("schedule", cfg.schedule)] + [(f"callbacks.{k}", v) for k, v in cfg.callbacks.items()]
    return [
        (key, build(node, key, cfg.allowed_targets, run_dir=run_dir))
        for key, node in nodes
        if node is not None
    ]


def check_monitors(
    cfg: TrainConfig,
    callbacks: Sequence[tuple[str, Any]],
    validates: bool,
    sequences: bool = True,
) -> None:
    """Refuse a monitor (`checkpoint.best_monitor`, a callback's `monitor`) in the loop's
    namespaces (train/, val/, test/) that the fit does not log: a misspelt one would watch
    nothing, and no one would be told. The loop's metrics are listed in trainer/metrics.py.

    Other names belong to callbacks, which may be added in code as well as in the config, so
    they pass. A callback that logs into the loop's namespaces (say val/f1) lists those names
    in a `logged_metrics` attribute. `sequences`: whether the model predicts sequences
    (perplexity is logged); True where not known yet.
    """
    logged = fit_metrics(validates=validates, skips=cfg.nonfinite == "skip", sequences=sequences)
    for _, callback in callbacks:
        logged.extend(getattr(callback, "logged_metrics", ()))
    monitors = [("checkpoint.best_monitor", cfg.checkpoint.best_monitor)] + [
        (f"{key}.monitor", callback.monitor)
        for key, callback in callbacks
        if isinstance(getattr(callback, "monitor", None), str)
    ]
    for key, name in monitors:
        if name is None or not name.startswith(LOOP_PREFIXES) or _is_logged(name, logged):
            continue
        if name in eval_metrics("test"):
            why = "is measured after the fit, too late to watch"
        elif name in eval_metrics("val"):
            why = "needs validation, and none runs (val_every_epochs=0, or the val split is empty)"
        else:
            why = "is not a metric this run logs"
        valid = ", ".join(n + "..." if n.endswith("/") else n for n in logged)
        raise ConfigError(
            f"{key}: {name!r} {why}; valid monitors: {valid} (and what callbacks log under "
            "their own names)"
        )


def _is_logged(name: str, logged: Sequence[str]) -> bool:
    return any(name == n or (n.endswith("/") and name.startswith(n)) for n in logged)


def _check_callback_order(callbacks: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Callbacks run in config order, and some orders are wrong; each callback class says which
    (`Callback.config_order_error`)."""
    earlier: list[tuple[str, type]] = []
    for name, node in callbacks.items():
        if node is None:
            continue
        target = resolve_target(node["_target_"], f"callbacks.{name}", allowed)
        if not inspect.isclass(target):
            continue
        order_error = getattr(target, "config_order_error", None)
        if order_error is not None:
            error = order_error(node, earlier)
            require(error is None, f"callbacks.{name}", str(error))
        earlier.append((name, target))


def _check_devices(cfg: TrainConfig) -> None:
    """What the device this run gets (`pick_device`, as the process will) cannot do."""
    require(
        cfg.device != "cuda" or torch.cuda.is_available(),
        "device",
        "cuda was asked for, but CUDA is not available here (use device=auto or device=cpu)",
    )
    if pick_device(cfg.device, local_rank=0).type != "cpu":
        return
    require(
        cfg.precision != "fp16",
        "precision",
        "fp16 needs a CUDA device (its autocast and grad scaler); this run is on the CPU: "
        "use precision=bf16",
    )
    # On CPU there is nothing to offload to, and FSDP2 cannot pin memory without an accelerator.
    require(
        not cfg.parallel.cpu_offload,
        "parallel.cpu_offload",
        "moves FSDP2's parameters off a GPU; this run is on the CPU already: leave it false",
    )
    require(
        not cfg.parallel.sync_batchnorm,
        "parallel.sync_batchnorm",
        "torch's SyncBatchNorm runs on GPUs only, and this run is on the CPU; set it to false "
        "(each rank then normalizes by its own share of the batch)",
    )
