"""`init_from`: start a new run from the model weights of an earlier one.

    hooktrain 'experiment=[mnist1d_cnn,compress_only]' init_from=outputs/dense   # a run folder
    hooktrain ... init_from=outputs/dense/checkpoints/step_00002240              # a checkpoint
    hooktrain ... init_from=outputs/dense/model.pt                               # plain weights

Only the weights come over: the optimizer, the step, the schedules, the callbacks' state and the
run folder are this run's own (that is what tells it from `resume`). A run folder gives its best
checkpoint (`checkpoint.best_monitor` in its config.yaml) if it keeps one, else its newest
complete checkpoint, else its `model.pt`; one log line says which. Everything is read through the
safe readers: a checkpoint is verified (manifest, checksums, DCP's metadata through the
allowlist) and its tensors read weights-only (trainer/checkpoint_reader.py), a weights file with
`torch.load(weights_only=True)` (trainer/export.py); nothing in them can run code.

The weights are loaded into the bare model before any wrapping: every rank reads the same file
and holds the full weights, which DDP then replicates and FSDP2 shards. Before anything is read
into the model, its names and shapes are checked against the file's: a missing or unexpected
weight, or another shape, is one CheckpointError naming the file and the weight, on every rank.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from trainer.checkpoint import Checkpointer, _cause
from trainer.checkpoint_reader import (
    MANIFEST,
    CheckpointError,
    ListedFilesReader,
    WeightsOnlyLoadPlanner,
    read_metadata,
    verify,
)
from trainer.config import CheckpointConfig
from trainer.distributed.env import DistEnv, any_rank
from trainer.export import FINAL_WEIGHTS, read_weights
from trainer.run_folder import CONFIG

log = logging.getLogger("hooktrain")


def load_initial_weights(model: nn.Module, path: str, env: DistEnv) -> None:
    """Load the weights `init_from` names into the bare `model` (on every rank), or raise
    CheckpointError on every rank when any rank cannot."""
    try:
        source, why = locate(Path(path))
        if source.is_dir():
            _load_checkpoint(model, source)
        else:
            _load_weights_file(model, source)
        error = None
    except CheckpointError as err:
        error = CheckpointError(f"init_from: {err}")  # the key, then the file and what is wrong
    # Every rank reads the same file, so they fail alike; but one that fails alone must not leave
    # the others waiting in the wrapping's collectives.
    if any_rank([error is not None], env.device)[0]:
        raise error or CheckpointError(f"init_from: {path}: another rank could not load it")
    if env.is_global_zero:
        log.info(f"init_from: model weights from {source} ({why})")


def locate(path: Path) -> tuple[Path, str]:
    """The checkpoint folder or weights file `path` names, and why that one."""
    if path.is_file():
        return path, "a weights file"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run folder, checkpoint folder or weights file")
    if (path / MANIFEST).exists():
        return path, "a checkpoint"
    best = _best_checkpoint(path)
    if best is not None:
        return best, "the run's best checkpoint"
    newest = Checkpointer(path, CheckpointConfig(), None).newest_valid()
    if newest is not None:
        return newest, "the run's newest complete checkpoint"
    if (path / FINAL_WEIGHTS).is_file():
        return path / FINAL_WEIGHTS, "the run's final weights: it holds no complete checkpoint"
    raise CheckpointError(
        f"{path}: holds no complete checkpoint (checkpoints/step_*) and no {FINAL_WEIGHTS}"
    )


def _best_checkpoint(run_dir: Path) -> Path | None:
    """The run's best checkpoint by its own `checkpoint.best_monitor`, verified; None when the
    run keeps no best (no config.yaml, no monitor, or no checkpoint scored)."""
    config = run_dir / CONFIG
    if not config.is_file():
        return None
    try:
        saved = OmegaConf.load(config).get("checkpoint") or {}
        monitor, mode = saved.get("best_monitor"), saved.get("best_mode", "max")
    except Exception as err:  # a YAML error: the run's other files may still serve
        warnings.warn(
            f"init_from: {config}: unreadable ({err}); not looking for a best checkpoint",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if not monitor:
        return None
    best = Checkpointer(
        run_dir, CheckpointConfig(best_monitor=monitor, best_mode=mode), None
    ).best()
    if best is not None:
        verify(best)  # the best one damaged: say so rather than quietly take a worse one
    return best


def _load_checkpoint(model: nn.Module, folder: Path) -> None:
    manifest = verify(folder)
    listed = set(manifest["files"])
    stored = read_metadata(folder, listed).state_dict_metadata
    shapes = {
        name.removeprefix("model."): tuple(meta.size)
        for name, meta in stored.items()
        if name.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    state = get_model_state_dict(model)
    check_fits(shapes, state, folder)
    try:
        # no_dist: each rank reads the whole model itself; nothing is sharded yet.
        dcp.load(
            {"model": state},
            storage_reader=ListedFilesReader(folder, listed),
            planner=WeightsOnlyLoadPlanner(),
            no_dist=True,
        )
        set_model_state_dict(model, state)
    except (Exception, dcp.api.CheckpointException) as err:  # DCP's is a BaseException
        raise CheckpointError(f"{folder}: could not be loaded ({_cause(err)})") from None


def _load_weights_file(model: nn.Module, path: Path) -> None:
    weights = read_weights(path)["state_dict"]
    if not isinstance(weights, dict) or not all(
        isinstance(t, torch.Tensor) for t in weights.values()
    ):
        raise CheckpointError(f"{path}: its state_dict is not a dict of tensors")
    check_fits({name: tuple(t.shape) for name, t in weights.items()}, model.state_dict(), path)
    model.load_state_dict(weights, strict=True)


def check_fits(saved: dict[str, tuple[int, ...]], model_state: dict[str, Any], path: Path) -> None:
    """The file holds exactly the model's weights, each of the model's shape; else one line
    naming the file and the first weight that differs."""
    expected = {name: tuple(t.shape) for name, t in model_state.items()}
    problems = [f"the model's {name} is missing from it" for name in expected if name not in saved]
    problems += [
        f"it holds {name}, which the model lacks" for name in saved if name not in expected
    ]
    problems += [
        f"{name} is {list(saved[name])} there and {list(shape)} in the model"
        for name, shape in expected.items()
        if name in saved and saved[name] != shape
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{path}: does not fit this run's model: {problems[0]}{more}; give the "
            "model and data of the run that wrote it"
        )
