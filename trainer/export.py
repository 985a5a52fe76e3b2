"""The plain weights file: a trained model as one file that loads anywhere.

`<run dir>/model.pt` (the weights a fit ends with) and `best_model.pt` (early stopping's best
weights) hold one dict of tensors and plain values only, so that `torch.load(path,
weights_only=True)` reads it without running any code the file might carry::

    {"format": "hooktrain.weights/1",
     "state_dict": {name: tensor},        # full (gathered from FSDP2 / TP shards), on CPU,
                                          # the user's module's names (no DDP / compile prefix)
     "model": {"_target_": ..., ...},     # the run's `model` node (a model handed to
                                          # trainer.api.fit: {_target_: trainer.api.given,
                                          # type: <its class>})
     "input_shape": [...], "num_classes": n}   # what build.py's build_model passes the model
                                               # (None: a model handed to fit)

    model = MyNet(...); model.load_state_dict(torch.load("model.pt", weights_only=True)["state_dict"])

or `trainer.export.load_model("model.pt")`, which rebuilds the model from its node. torch's
format rather than safetensors: it keeps the model's node in the same file, and needs no extra
package.
"""

from __future__ import annotations

import io
import os
import re
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
GIVEN = "trainer.api.given"  # the `_target_` config.yaml records for an object handed to fit


def model_spec(cfg: TrainConfig, input_shape: Any, num_classes: int | None) -> dict[str, Any]:
    """What rebuilds the model: its node and the data's facts that build.py's build_model passes
    (no class count for a model handed to `trainer.api.fit`: nothing passed it one)."""
    node = OmegaConf.to_container(OmegaConf.create(dict(cfg.model)), resolve=True)
    if node.get("_target_") == GIVEN:
        num_classes = None
    return {"model": node, "input_shape": [int(s) for s in input_shape], "num_classes": num_classes}


def run_spec(cfg: TrainConfig, train_data: Any = None) -> dict[str, Any]:
    """`model_spec` of a run's config. The data's facts are read from its dataset, rebuilt from
    the config, or from `train_data` (the training split the fit used) where the data was
    handed to `trainer.api.fit` and cannot be rebuilt; its classes are then counted as fit
    counts them, for a model built from the config only."""
    from trainer.build import build_data  # build.py imports the whole trainer
    from trainer.data.datasets import as_splits

    if cfg.data.dataset.get("_target_") == GIVEN and train_data is not None:
        count = cfg.model.get("_target_") != GIVEN
        splits = as_splits((train_data,), "data", count_classes=count)
    else:
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
    spec = run_spec(trainer.cfg, trainer.state.train_data)
    return write_weights(trainer.model, Path(run_dir) / FINAL_WEIGHTS, spec)


def write_best_weights(model: nn.Module, run_dir: str | os.PathLike, train_data: Any) -> Path:
    """`<run dir>/best_model.pt`: early stopping's best weights, the model's node from the run's
    config.yaml (`train_data`: the fit's training split, see `run_spec`). Every rank calls it."""
    from trainer.commands import run_config

    spec = run_spec(run_config(Path(run_dir)), train_data)
    return write_weights(model, Path(run_dir) / BEST_WEIGHTS, spec)


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A weights file's contents, read weights-only; CheckpointError naming the file otherwise."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    except Exception as err:  # truncated, junk, or refused by the weights-only unpickler
        raise CheckpointError(
            f"{path}: not a weights file hooktrain can read ({load_failure(err)})"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a hooktrain weights file (no format {FORMAT!r})")
    return saved


def load_failure(err: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in a few words: torch's own message
    runs to several sentences (and terminal colours) for a truncated or pickled-object file."""
    text = str(err)
    if refused := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"it holds a {refused[1]}, an object a weights-only load does not build"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    # the weights-only unpickler's own reason, else the first sentence of torch's message
    reason = (text.partition("WeightsUnpickler error:")[2] or text).strip()
    words = (reason.splitlines() or [""])[0].split(". ")[0]
    return f"not a file torch.save wrote, or a truncated one: {type(err).__name__}: {words}"


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
