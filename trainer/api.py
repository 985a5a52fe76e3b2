"""The Python API: `fit` trains from a script, a notebook or a torchrun worker, through the same
recipes, validation, run folder and summary as the `hooktrain` command.

    from trainer.api import fit
    summary = fit(model=MyNet(), data=(train_ds, val_ds, test_ds),
                  overrides=["optim.lr=3e-3", "max_epochs=5"])
    summary = fit(config="my.yaml")      # = hooktrain --config-dir . --config-name my

The config is composed with Hydra's compose API from the packaged recipes: no `sys.argv`, no
change of working folder, no logging set up. The loop installs its stop-signal handlers only in
the main thread (trainer/stop_signals.py), so `fit` also runs in a worker thread. Under torchrun
every rank calls `fit`; the process group comes from the environment, as for the command.

A model or datasets handed in are used as they are: the config's node for them is replaced by
`{_target_: trainer.api.given, type: <their class>}`, which is what config.yaml records. Bad
input raises `ConfigError` or `CheckpointError` (the command's exit codes 2 and 3).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from trainer import run_folder
from trainer.checkpoint import CheckpointError
from trainer.cli import composition_message, configured_wandb, recipes_dir, run_in_folder
from trainer.config import ConfigError
from trainer.data.datasets import DataSplits, as_splits
from trainer.own_code import overridden_keys, replace_overridden_nodes

__all__ = ["fit", "compose_config", "given", "ConfigError", "CheckpointError"]


def fit(
    model: nn.Module | None = None,
    data: DataSplits | Sequence[Any] | Any = None,
    *,
    config: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train, test and summarise a run; returns the summary (summary.json's keys).

    `model`: a built `nn.Module` (the config's `model` node is then ignored). `data`: DataSplits,
    or (train, val, test) map-style datasets of (input, target) items (val and test may be left
    out or None); a DataLoader is taken as its dataset and batch size, with a warning (hooktrain
    samples resumably itself). `config`: a YAML primary config (its defaults list names `train`);
    `overrides`: the command line's `key=value`s. `run_dir`: the run folder; by default a new
    one under ./outputs, as the command makes."""
    started = time.time()
    for node, obj in (("model", model), ("data.dataset", data)):
        for key in overridden_keys(overrides) if obj is not None else ():
            if key == node or key.startswith(f"{node}."):
                raise ConfigError(
                    f"{key}: {node} is handed to fit as an object; its config is not used"
                )
    cfg = compose_config(config, overrides)
    splits = None
    if data is not None:
        splits, batch_size = _given_splits(data, count_classes=model is None)
        cfg.data.dataset = {"_target_": "trainer.api.given", "type": _type_path(splits.train)}
        if batch_size is not None:
            cfg.data.batch_size = batch_size
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model: must be a torch.nn.Module; got a {type(model).__name__}")
        cfg.model = {"_target_": "trainer.api.given", "type": _type_path(model)}
    folder = Path(run_dir) if run_dir is not None else Path(run_folder.new_run_folder("outputs"))
    rank_zero = os.environ.get("RANK", "0") == "0"
    made_for_this_call = rank_zero and (not folder.exists() or run_folder.holds_nothing_yet(folder))
    try:
        return run_in_folder(cfg, folder, started, model=model, splits=splits)
    except (ConfigError, CheckpointError):
        if made_for_this_call and folder.exists():
            run_folder.discard(folder)  # a refused call leaves no run folder behind
        raise


def compose_config(
    config: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> DictConfig:
    """The config `hooktrain` would compose for these overrides (and `--config-dir <config's
    folder> --config-name <config's name>` when `config` names a file), with wandb on where the
    user has configured it (`trainer.cli.configured_wandb`), as for the command."""
    overrides = configured_wandb(replace_overridden_nodes(overrides), own_config=config is not None)
    config_dir, name = recipes_dir(), "train"
    if config is not None:
        path = Path(config).resolve()
        if not path.is_file():
            raise ConfigError(f"config: no file {config}")
        config_dir, name = path.parent, path.stem
        overrides.append(f"hydra.searchpath=[file://{recipes_dir()}]")
    with initialize_config_dir(str(config_dir), version_base="1.3", job_name="hooktrain"):
        try:
            return compose(name, overrides=overrides)
        except (ConfigCompositionException, OverrideParseException) as err:
            raise ConfigError(composition_message(err)) from None


def given(type: str, **_: Any) -> NoReturn:  # noqa: A002 - the key config.yaml shows
    """The `_target_` recorded for a model or dataset handed to `fit` (`type` says its class).
    `fit` uses the object itself; a config that names this can only be trained from Python."""
    raise ConfigError(
        f"{type} was handed to trainer.api.fit as an object; load the weights file's state_dict "
        "into that class, or hand the object again "
        "(trainer.commands.evaluate(..., model=..., splits=...))"
    )


def _given_splits(data: Any, count_classes: bool) -> tuple[DataSplits, int | None]:
    """The splits of `data`, and the batch size of a training DataLoader handed in."""
    if isinstance(data, DataSplits):
        return as_splits(data, "data"), None
    parts = list(data) if isinstance(data, (tuple, list)) else [data]
    batch_size = None
    for i, part in enumerate(parts):
        if isinstance(part, DataLoader):
            name = ("train", "val", "test")[i] if i < 3 else str(i)
            if i == 0:
                batch_size = part.batch_size
            warnings.warn(
                f"data: the {name} DataLoader is replaced by its dataset (hooktrain samples each "
                "split itself, resumably)"
                + (f"; its batch_size {batch_size} is data.batch_size" if i == 0 else ""),
                stacklevel=3,
            )
            parts[i] = part.dataset
    return as_splits(tuple(parts), "data", count_classes), batch_size


def _type_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"
