"""The configuration schema, its validation, and safe instantiation of `_target_` nodes.

Hydra composes `recipes/train.yaml` on top of the `TrainConfig` dataclass registered below, so an
unknown key or a wrong type in a fixed section is rejected while composing. What composition cannot
see is checked by `validate()` before any process group starts:

- impossible values (a negative learning rate, a zero batch size) -- the dataclasses' `__post_init__`;
- keys slipped in with `+key=value` -- `OmegaConf.to_object` refuses keys the dataclass lacks;
- `_target_` nodes (model, dataset, optimizer, schedule, callbacks, loggers) -- the target must lie
  under an allowed module prefix, and every key must be a parameter of the target with a value of
  the annotated type.

Every failure raises `ConfigError` with one message naming the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


@dataclass
class DataConfig:
    dataset: dict[str, Any] = field(default_factory=dict)  # a `_target_` node -> DataSplits
    batch_size: int = 64  # per data-parallel rank; the global batch is batch_size * dp ranks
    eval_batch_size: int = 512
    num_workers: int = 0
    shuffle: bool = True  # reshuffle the training set every epoch (seeded, same on every rank)
    drop_last: bool = True
    # A training set held as a TensorDataset gives each batch by one index per tensor, not one
    # __getitem__ per sample and a stack: the same batches, several times faster to make.
    batched_fetch: bool = True

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(
            self.eval_batch_size >= 1,
            "data.eval_batch_size",
            f"must be >= 1, got {self.eval_batch_size}",
        )
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")


STRATEGIES = ("none", "ddp", "fsdp", "tp", "fsdp_tp")


@dataclass
class ParallelConfig:
    strategy: str = "none"  # none | ddp | fsdp | tp | fsdp_tp
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo
    timeout_s: int = 300  # collectives that wait longer than this fail instead of hanging
    tp_degree: int = 0  # ranks per tensor-parallel group; 0: all ranks for tp, 2 for fsdp_tp
    param_dtype: str = "fp32"  # FSDP2 compute dtype (fp32 | bf16); gradients reduce in fp32
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (less memory)
    cpu_offload: bool = False  # FSDP2: keep sharded params and optimizer state on the CPU
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # > 1: `hooktrain` starts this many local processes itself through torchrun's engine (for
    # sweeps and quick runs); under torchrun, leave it at 1.
    nproc_per_node: int = 1

    def __post_init__(self) -> None:
        _require(
            self.strategy in STRATEGIES,
            "parallel.strategy",
            f"must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}",
        )
        _require(
            self.param_dtype in ("fp32", "bf16"),
            "parallel.param_dtype",
            f"must be fp32 or bf16; got {self.param_dtype!r}",
        )
        _require(self.tp_degree >= 0, "parallel.tp_degree", f"must be >= 0, got {self.tp_degree}")
        _require(
            self.nproc_per_node >= 1,
            "parallel.nproc_per_node",
            f"must be >= 1, got {self.nproc_per_node}",
        )
        _require(
            self.backend in ("auto", "nccl", "gloo"),
            "parallel.backend",
            f"must be one of auto, nccl, gloo; got {self.backend!r}",
        )
        _require(self.timeout_s > 0, "parallel.timeout_s", f"must be > 0, got {self.timeout_s}")

    def degrees(self, world_size: int) -> tuple[int, int]:
        """(data-parallel, tensor-parallel) degrees; they must multiply to the world size."""
        _require(
            self.strategy != "none" or world_size == 1,
            "parallel.strategy",
            f"none runs one process, but {world_size} were started; use ddp, fsdp, tp or fsdp_tp",
        )
        if self.strategy in ("none", "ddp", "fsdp"):
            _require(
                self.tp_degree in (0, 1),
                "parallel.tp_degree",
                f"applies to tp and fsdp_tp only; strategy is {self.strategy}",
            )
            return world_size, 1
        tp = self.tp_degree or (world_size if self.strategy == "tp" else 2)
        _require(
            world_size % tp == 0,
            "parallel.tp_degree",
            f"{tp} does not divide the world size {world_size}",
        )
        if self.strategy == "tp":
            _require(
                tp == world_size,
                "parallel.tp_degree",
                f"strategy tp shards over all {world_size} ranks; got {tp} (use fsdp_tp for 2-D)",
            )
        return world_size // tp, tp


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of fit
    # The newest K complete checkpoints are kept (at least 2: one to fall back on if the newest
    # turns out damaged), plus the best by `best_monitor` when that is set.
    keep_last: int = 2
    best_monitor: str | None = None  # a state.metrics key, e.g. val/accuracy; null: no best kept
    best_mode: str = "max"  # max | min: which value of best_monitor is best
    save_final: bool = True
    # Write in a background thread while training goes on (torch.distributed.checkpoint's
    # async_save); the checkpoint is committed at the next save or at the end of fit.
    async_save: bool = False

    def __post_init__(self) -> None:
        _require(
            self.every_steps >= 0,
            "checkpoint.every_steps",
            f"must be >= 0, got {self.every_steps}",
        )
        _require(
            self.keep_last >= 2,
            "checkpoint.keep_last",
            f"must be >= 2 (the previous checkpoint is the fallback for a damaged one), got {self.keep_last}",
        )
        _require(
            self.best_mode in ("max", "min"),
            "checkpoint.best_mode",
            f"must be max or min; got {self.best_mode!r}",
        )


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # `_target_` node -> nn.Module
    optim: dict[str, Any] = field(default_factory=dict)  # `_target_` node -> optimizer (partial)
    schedule: dict[str, Any] | None = None  # `_target_` node -> LRSchedule callback
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> `_target_` node (or null)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> `_target_` node (or null)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    seed: int = 0
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler, CUDA only)
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # torch.use_deterministic_algorithms
    # CPU: malloc keeps freed blocks for reuse instead of faulting them back in each step
    # (trainer/allocator.py).
    keep_freed_memory: bool = True
    max_epochs: int = 15
    max_steps: int = -1  # optimizer steps; -1 means max_epochs decides
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    log_every_steps: int = 10
    # While fitting, Python's own cyclic GC is off and the loop collects the young generations
    # every this many steps, on every rank at the same step; 0 leaves the automatic GC on.
    gc_every_steps: int = 50
    val_every_epochs: int = 1  # 0 turns per-epoch validation off
    test_after_fit: bool = True
    resume: str | None = None  # null | auto | a checkpoint folder
    # A NaN/inf loss or gradient norm: raise (naming the step) | skip the step | stop with a
    # checkpoint. (fp16's grad scaler skips such steps itself.)
    nonfinite: str = "raise"
    max_consecutive_skips: int = 5
    # Module prefixes a `_target_` may name. Extend it to instantiate your own classes.
    allowed_targets: list[str] = field(
        default_factory=lambda: ["trainer.", "torch.optim.", "torch.nn."]
    )

    def __post_init__(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda"),
            "device",
            f"must be auto, cpu or cuda; got {self.device!r}",
        )
        _require(
            self.precision in ("fp32", "bf16", "fp16"),
            "precision",
            f"must be fp32, bf16 or fp16; got {self.precision!r}",
        )
        _require(self.max_epochs >= 1, "max_epochs", f"must be >= 1, got {self.max_epochs}")
        _require(
            self.max_steps == -1 or self.max_steps >= 1,
            "max_steps",
            f"must be -1 (use max_epochs) or >= 1, got {self.max_steps}",
        )
        _require(
            self.grad_accum_steps >= 1,
            "grad_accum_steps",
            f"must be >= 1, got {self.grad_accum_steps}",
        )
        _require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _require(
            self.nonfinite in ("raise", "skip", "stop"),
            "nonfinite",
            f"must be raise, skip or stop; got {self.nonfinite!r}",
        )
        _require(
            self.max_consecutive_skips >= 0,
            "max_consecutive_skips",
            f"must be >= 0, got {self.max_consecutive_skips}",
        )
        _require(
            self.log_every_steps >= 1,
            "log_every_steps",
            f"must be >= 1, got {self.log_every_steps}",
        )
        _require(
            self.gc_every_steps >= 0,
            "gc_every_steps",
            f"must be >= 0 (0: Python's automatic GC), got {self.gc_every_steps}",
        )
        _require(
            self.val_every_epochs >= 0,
            "val_every_epochs",
            f"must be >= 0, got {self.val_every_epochs}",
        )
        for name, node in (("model", self.model), ("optim", self.optim)):
            _require(
                "_target_" in node, name, "needs a `_target_` (pick one from the config group)"
            )
        _require("_target_" in self.data.dataset, "data.dataset", "needs a `_target_`")
        lr = self.optim.get("lr")
        if isinstance(lr, (int, float)):  # a type error is reported by check_target instead
            _require(lr > 0, "optim.lr", f"must be > 0, got {lr}")


def register_schema() -> None:
    """Make `train_schema` available to `recipes/train.yaml`'s defaults list."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


# --------------------------------------------------------------------------------------------
# Validation of the composed config
# --------------------------------------------------------------------------------------------


def validate(cfg: DictConfig, world_size: int | None = None) -> TrainConfig:
    """Check everything about `cfg` that can be checked without building anything.

    `world_size` defaults to the launcher's (WORLD_SIZE, or 1) and checks the parallel degrees.
    """
    if OmegaConf.get_type(cfg) is TrainConfig:
        _reject_unknown_keys(cfg, TrainConfig)
    try:
        typed = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    except (TypeError, ValueError) as err:
        # to_object re-raises our __post_init__ errors and unknown-key TypeErrors from dataclasses.
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(str(err)) from None
    if not isinstance(typed, TrainConfig):
        raise ConfigError("the config does not follow the train schema (missing `train_schema`?)")

    typed.parallel.degrees(world_size or int(os.environ.get("WORLD_SIZE", "1")))
    if typed.resume not in (None, "auto"):
        _require(
            os.path.isdir(typed.resume),
            "resume",
            f"no checkpoint folder at {typed.resume!r} (use a checkpoints/step_N folder, or auto)",
        )
    allowed = tuple(typed.allowed_targets)
    check_target(typed.model, "model", allowed, injected=("input_shape", "num_classes"))
    check_target(typed.data.dataset, "data.dataset", allowed)
    check_target(typed.optim, "optim", allowed, injected=("params",))
    if typed.schedule is not None:
        check_target(typed.schedule, "schedule", allowed, injected=("run_dir",))
    for group, nodes, injected in (
        ("callbacks", typed.callbacks, ("run_dir",)),
        ("logger", typed.logger, ("save_dir",)),
    ):
        for name, node in nodes.items():
            if node is not None:
                _require(isinstance(node, Mapping), f"{group}.{name}", "must be a mapping or null")
                check_target(node, f"{group}.{name}", allowed, injected=injected)
    _check_callback_order(typed.callbacks, allowed)
    return typed


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
            _require(error is None, f"callbacks.{name}", str(error))
        earlier.append((name, target))


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Refuse keys the schema lacks (`+key=value` adds them without complaint)."""
    names = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    for key in node:
        path = f"{prefix}{key}"
        _require(key in names, path, f"unknown key (the schema has: {', '.join(names)})")
        child = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig):
            _reject_unknown_keys(child, hints[key], f"{path}.")


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    text = str(err).splitlines()[0]
    return f"{key}: {text}" if key else text


def resolve_target(path: str, key: str, allowed: Sequence[str]) -> Any:
    _require(
        isinstance(path, str) and path.startswith(tuple(allowed)),
        f"{key}._target_",
        f"{path!r} is outside the allowed module prefixes {list(allowed)} "
        "(add yours to `allowed_targets`)",
    )
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}._target_: cannot import {path!r} ({err})") from None


def check_target(
    node: Mapping[str, Any], key: str, allowed: Sequence[str], injected: Sequence[str] = ()
) -> None:
    """Refuse a `_target_` node whose keys are not parameters of the target, or of the wrong type.

    `injected` names the arguments the trainer supplies itself (e.g. a model's `input_shape`).
    """
    _require(isinstance(node, Mapping) and "_target_" in node, key, "needs a `_target_`")
    target = resolve_target(node["_target_"], key, allowed)
    signature = inspect.signature(target)
    params = signature.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: skip type checks, keep the key checks
        hints = {}
    for name, value in node.items():
        if name.startswith("_") and name.endswith("_"):  # _target_, _partial_, ...
            continue
        _require(
            name not in injected,
            f"{key}.{name}",
            "is set by the trainer; remove it from the config",
        )
        if name not in params:
            _require(
                takes_kwargs,
                f"{key}.{name}",
                f"unknown key for {node['_target_']} (it takes: {', '.join(p for p in params if p not in injected and p != 'self')})",
            )
            continue
        expected = hints.get(name)
        if expected is not None and not _matches(value, expected):
            raise ConfigError(
                f"{key}.{name}: expected {_type_name(expected)}, got {type(value).__name__} {value!r}"
            )


def _matches(value: Any, expected: Any) -> bool:
    """A forgiving isinstance for the annotations configs use (int, float, Sequence[int], ...)."""
    origin = typing.get_origin(expected)
    if expected is Any or isinstance(expected, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        expected = origin
    if expected in (Sequence, list, tuple, typing.Sequence):
        return isinstance(value, Sequence) and not isinstance(value, str)
    if isinstance(expected, type):
        try:
            return isinstance(value, expected)
        except TypeError:
            return True
    return True  # annotations we do not model (Callable, Literal, ...) are left to the target


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


def build(node: Mapping[str, Any], key: str, allowed: Sequence[str], **injected: Any) -> Any:
    """Instantiate a validated `_target_` node, passing `injected` arguments the target accepts."""
    check_target(node, key, allowed, injected=tuple(injected))
    target = resolve_target(node["_target_"], key, allowed)
    params = inspect.signature(target).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in injected.items() if takes_kwargs or k in params}
    return instantiate(dict(node), **accepted, _convert_="all")
