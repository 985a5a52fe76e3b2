"""The configuration schema, and `validate()`, which checks a composed config against it.

Hydra composes `recipes/train.yaml` on top of the `TrainConfig` dataclass registered below, so an
unknown key or a wrong type in a fixed section is rejected while composing. What composition cannot
see is checked by `validate()` before any process group starts:

- impossible values (a negative learning rate, a zero batch size) -- the dataclasses' `__post_init__`;
- keys slipped in with `+key=value` -- `OmegaConf.to_object` refuses keys the dataclass lacks;
- `_target_` nodes (model, dataset, optimizer, schedule, callbacks, loggers) -- the target must lie
  under an allowed module prefix, and every key must be a parameter of the target with a value of
  the annotated type (trainer/targets.py);
- what the values mean together: devices, monitors, the callbacks' own argument checks
  (trainer/validation.py).

Every failure raises `ConfigError` with one message naming the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import ConfigError, require
from trainer.targets import build  # noqa: F401  (re-exported: trainer.config.build)
from trainer.validation import check_run


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
        require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        require(
            self.eval_batch_size >= 1,
            "data.eval_batch_size",
            f"must be >= 1, got {self.eval_batch_size}",
        )
        require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")


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
    # ddp: BatchNorm layers become SyncBatchNorm, so that their statistics are those of the global
    # batch rather than of each rank's share. torch computes them on GPUs only (CUDA here).
    sync_batchnorm: bool = False
    # > 1: `hooktrain` starts this many local processes itself through torchrun's engine (for
    # sweeps and quick runs); under torchrun, leave it at 1.
    nproc_per_node: int = 1

    def __post_init__(self) -> None:
        require(
            self.strategy in STRATEGIES,
            "parallel.strategy",
            f"must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}",
        )
        require(
            self.param_dtype in ("fp32", "bf16"),
            "parallel.param_dtype",
            f"must be fp32 or bf16; got {self.param_dtype!r}",
        )
        require(self.tp_degree >= 0, "parallel.tp_degree", f"must be >= 0, got {self.tp_degree}")
        require(
            self.nproc_per_node >= 1,
            "parallel.nproc_per_node",
            f"must be >= 1, got {self.nproc_per_node}",
        )
        require(
            self.backend in ("auto", "nccl", "gloo"),
            "parallel.backend",
            f"must be one of auto, nccl, gloo; got {self.backend!r}",
        )
        require(self.timeout_s > 0, "parallel.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(
            not self.sync_batchnorm or self.strategy == "ddp",
            "parallel.sync_batchnorm",
            f"applies to ddp only (SyncBatchNorm under FSDP2 or tensor parallelism is not "
            f"supported here); strategy is {self.strategy}",
        )
        require(
            not self.cpu_offload or self.strategy in ("fsdp", "fsdp_tp"),
            "parallel.cpu_offload",
            f"applies to fsdp and fsdp_tp only; strategy is {self.strategy}",
        )

    def degrees(self, world_size: int) -> tuple[int, int]:
        """(data-parallel, tensor-parallel) degrees; they must multiply to the world size. One
        process runs any recipe: a tensor-parallel degree it cannot hold becomes 1, with a
        warning."""
        require(
            self.strategy != "none" or world_size == 1,
            "parallel.strategy",
            f"none runs one process, but {world_size} were started; use ddp, fsdp, tp or fsdp_tp",
        )
        if self.strategy in ("none", "ddp", "fsdp"):
            require(
                self.tp_degree in (0, 1),
                "parallel.tp_degree",
                f"applies to tp and fsdp_tp only; strategy is {self.strategy}",
            )
            return world_size, 1
        tp = self.tp_degree or (world_size if self.strategy == "tp" else 2)
        if world_size == 1 and tp > 1:
            # A debug run of a scale-out recipe: the same recipe, one process, nothing sharded.
            warnings.warn(
                f"parallel.tp_degree: {tp} needs {tp} ranks; this single process runs the plain "
                "model (tp_degree=1)",
                stacklevel=2,
            )
            return 1, 1
        require(
            world_size % tp == 0,
            "parallel.tp_degree",
            f"{tp} does not divide the world size {world_size}",
        )
        if self.strategy == "tp":
            require(
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
        require(
            self.every_steps >= 0,
            "checkpoint.every_steps",
            f"must be >= 0, got {self.every_steps}",
        )
        require(
            self.keep_last >= 2,
            "checkpoint.keep_last",
            f"must be >= 2 (the previous checkpoint is the fallback for a damaged one), got {self.keep_last}",
        )
        require(
            self.best_mode in ("max", "min"),
            "checkpoint.best_mode",
            f"must be max or min; got {self.best_mode!r}",
        )


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # `_target_` node -> nn.Module
    optim: dict[str, Any] = field(default_factory=dict)  # `_target_` node -> optimizer (partial)
    # `_target_` node -> what a step minimizes (trainer/losses.py); evaluation's loss stays CE
    loss: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "trainer.losses.CrossEntropy"}
    )
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
    # A run folder, checkpoint folder or weights file whose model weights start this run: a new
    # run (fresh optimizer, step 0, its own folder), e.g. to compress a model trained earlier.
    init_from: str | None = None
    # A NaN/inf loss or gradient norm: raise (naming the step) | skip the step | stop with a
    # checkpoint. (fp16's grad scaler skips such steps itself.)
    nonfinite: str = "raise"
    max_consecutive_skips: int = 5
    # Module prefixes a `_target_` may name. Extend it to instantiate your own classes.
    allowed_targets: list[str] = field(
        default_factory=lambda: ["trainer.", "torch.optim.", "torch.nn."]
    )

    def __post_init__(self) -> None:
        require(
            self.device in ("auto", "cpu", "cuda"),
            "device",
            f"must be auto, cpu or cuda; got {self.device!r}",
        )
        require(
            self.precision in ("fp32", "bf16", "fp16"),
            "precision",
            f"must be fp32, bf16 or fp16; got {self.precision!r}",
        )
        # 0 trains nothing: only the fit-end stages run (compressing a model given by init_from).
        require(self.max_epochs >= 0, "max_epochs", f"must be >= 0, got {self.max_epochs}")
        require(
            self.max_steps == -1 or self.max_steps >= 1,
            "max_steps",
            f"must be -1 (use max_epochs) or >= 1, got {self.max_steps}",
        )
        require(
            self.grad_accum_steps >= 1,
            "grad_accum_steps",
            f"must be >= 1, got {self.grad_accum_steps}",
        )
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        require(
            self.nonfinite in ("raise", "skip", "stop"),
            "nonfinite",
            f"must be raise, skip or stop; got {self.nonfinite!r}",
        )
        require(
            self.max_consecutive_skips >= 0,
            "max_consecutive_skips",
            f"must be >= 0, got {self.max_consecutive_skips}",
        )
        require(
            self.log_every_steps >= 1,
            "log_every_steps",
            f"must be >= 1, got {self.log_every_steps}",
        )
        require(
            self.gc_every_steps >= 0,
            "gc_every_steps",
            f"must be >= 0 (0: Python's automatic GC), got {self.gc_every_steps}",
        )
        require(
            self.val_every_epochs >= 0,
            "val_every_epochs",
            f"must be >= 0, got {self.val_every_epochs}",
        )
        for name, node in (("model", self.model), ("optim", self.optim)):
            require("_target_" in node, name, "needs a `_target_` (pick one from the config group)")
        require("_target_" in self.data.dataset, "data.dataset", "needs a `_target_`")
        require(
            not (self.resume and self.init_from),
            "init_from",
            f"starts a new run from {self.init_from}'s weights, and resume={self.resume} "
            "continues one; give one of them (a stopped run started with init_from resumes "
            "with resume=auto and init_from=null)",
        )
        lr = self.optim.get("lr")
        if isinstance(lr, (int, float)):  # a type error is reported by check_target instead
            require(lr > 0, "optim.lr", f"must be > 0, got {lr}")


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

    check_run(typed, world_size or int(os.environ.get("WORLD_SIZE", "1")))
    return typed


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Refuse keys the schema lacks (`+key=value` adds them without complaint)."""
    names = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    for key in node:
        path = f"{prefix}{key}"
        require(key in names, path, f"unknown key (the schema has: {', '.join(names)})")
        child = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig):
            _reject_unknown_keys(child, hints[key], f"{path}.")


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    text = str(err).splitlines()[0]
    return f"{key}: {text}" if key else text
