"""The plain weights file: a trained model as one file that loads anywhere.

`<run dir>/model.pt` (the weights a fit ends with) and `best_model.pt` (early stopping's best
weights) hold one dict of tensors and plain values only, so that `torch.load(path,
weights_only=True)` reads it without running any code the file might carry::

    {"format": "hooktrain.weights/1",
     "state_dict": {name: tensor},        # full (gathered from FSDP2 / TP shards), on CPU,
                                          # the user's module's names (no DDP / compile prefix)
     "model": {"_target_": ..., ...},     # the run's `model` node
     "input_shape": [...], "num_classes": n}   # what build.py's build_model passes the model

    model = MyNet(...); model.load_state_dict(torch.load("model.pt", weights_only=True)["state_dict"])

or `trainer.export.load_model("model.pt")`, which rebuilds the model from its node. torch's
format rather than safetensors: it keeps the model's node in the same file, and needs no extra
package.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from trainer.checkpoint import _write_atomic
from trainer.checkpoint_reader import CheckpointError
from trainer.config import TrainConfig
from trainer.distributed.env import dist_rank
from trainer.distributed.parallelize import unwrap
from trainer.errors import ConfigError
from trainer.run_folder import CONFIG

FORMAT = "hooktrain.weights/1"
FINAL_WEIGHTS = "model.pt"
BEST_WEIGHTS = "best_model.pt"


def model_spec(cfg: TrainConfig, input_shape: Any, num_classes: int) -> dict[str, Any]:
    """What rebuilds the model: its node and the data's facts that build.py's build_model passes."""
    node = OmegaConf.to_container(OmegaConf.create(dict(cfg.model)), resolve=True)
    return {"model": node, "input_shape": [int(s) for s in input_shape], "num_classes": num_classes}


def run_spec(cfg: TrainConfig) -> dict[str, Any]:
    """`model_spec` of a run's config, the data's facts read from its dataset."""
    from trainer.build import build_data  # build.py imports the whole trainer

    splits = build_data(cfg)
    return model_spec(cfg, splits.input_shape, splits.num_classes)


def write_weights(model: nn.Module, path: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Gather `model`'s full weights and write them with `spec` (see `model_spec`) to `path`,
    atomically, on rank 0. A collective under FSDP2 / TP: every rank calls it."""
    # cpu_offload: gathered straight to CPU, and kept on rank 0 only.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state_dict = get_model_state_dict(unwrap(model), options=options)
    path = Path(path)
    if dist_rank() == 0:
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "state_dict": weights, **spec}, buffer)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, buffer.getvalue())  # temp name, fsync, rename
    return path


def write_final_weights(trainer: Any, run_dir: str | os.PathLike) -> Path:
    """`<run dir>/model.pt`: the weights the fit ended with (early stopping's best ones when it
    restored them). Every rank calls it after `fit()`."""
    return write_weights(trainer.model, Path(run_dir) / FINAL_WEIGHTS, run_spec(trainer.cfg))


def write_best_weights(model: nn.Module, run_dir: str | os.PathLike) -> Path:
    """`<run dir>/best_model.pt`: early stopping's best weights, the model rebuilt from the
    run's config.yaml. Every rank calls it."""
    from trainer.commands import run_config

    return write_weights(model, Path(run_dir) / BEST_WEIGHTS, run_spec(run_config(Path(run_dir))))


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A weights file's contents, read weights-only; CheckpointError naming the file otherwise."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    except Exception as err:  # truncated, junk, or refused by the weights-only unpickler
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a weights file hooktrain can read ({first})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a hooktrain weights file (no format {FORMAT!r})")
    return saved


def load_model(
    path: str | os.PathLike, allowed_targets: list[str] | None = None, strict: bool = True
) -> nn.Module:
    """Rebuild the model of a weights file (or of a run folder's model.pt) and load its weights.

    The model's `_target_` must be under `allowed_targets`: by default the run's own (from the
    config.yaml beside the file) or hooktrain's defaults, never a list the file itself names."""
    from trainer.targets import build

    path = Path(path)
    if path.is_dir():
        path = path / FINAL_WEIGHTS
    saved = read_weights(path)
    if allowed_targets is None:
        allowed_targets = run_allowed_targets(path.parent)
    model = build(
        saved["model"],
        "model",
        allowed_targets,
        input_shape=tuple(saved["input_shape"]),
        num_classes=saved["num_classes"],
    )
    try:
        model.load_state_dict(saved["state_dict"], strict=strict)
    except RuntimeError as err:
        first = " ".join(str(err).split())
        raise CheckpointError(
            f"{path}: does not fit {saved['model']['_target_']} ({first})"
        ) from None
    return model.eval()


def run_allowed_targets(run_dir: Path) -> list[str]:
    """The run's `allowed_targets` from its config.yaml, else hooktrain's defaults."""
    config = run_dir / CONFIG
    if config.is_file():
        try:
            targets = OmegaConf.load(config).get("allowed_targets")
        except Exception as err:  # a YAML error
            raise ConfigError(f"{config}: unreadable ({err})") from None
        if targets:
            return list(targets)
    return OmegaConf.structured(TrainConfig).allowed_targets
