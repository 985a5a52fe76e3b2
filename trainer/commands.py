"""`hooktrain evaluate | predict | export`: use a trained run without training it.

    hooktrain evaluate outputs/2026-01-01/12-00-00-abc123 --split test   # -> eval_test.json
    hooktrain predict  <run> --split test --out predictions.pt          # logits and argmax
    hooktrain predict  <run> --data inputs.pt --out predictions.pt      # your own inputs
    hooktrain export   <run> --best --out best.pt                      # a plain weights file

Each takes a run folder (its model.pt, else its newest complete checkpoint; `export` always a
checkpoint), one checkpoint folder (`<run>/checkpoints/step_N`), or a weights file, and rebuilds
the data and model from the run's config.yaml. Checkpoints are read only through the verified,
weights-only reader (trainer/checkpoint_reader.py). Bad input ends in one line and exit code 2
(config) or 3 (checkpoint), and nothing is written. From Python: `evaluate`, `predict`, `export`;
a run whose model or data was handed to `trainer.api.fit` as an object takes it again
(`model=`, `splits=`), since its config.yaml cannot rebuild it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import OmegaConf

from trainer import export as weights
from trainer.checkpoint import Checkpointer, CheckpointError, load_model_weights
from trainer.checkpoint_reader import COMMITTED, MANIFEST
from trainer.config import CheckpointConfig, ConfigError, ParallelConfig, TrainConfig, validate
from trainer.data.datasets import DataSplits, as_splits
from trainer.distributed.env import DistEnv, pick_device
from trainer.run_folder import CONFIG

SPLITS = ("val", "test")
SUMMARY = "summary.json"


@dataclass(frozen=True)
class Source:
    """Where a command's weights come from: a checkpoint folder or a weights file."""

    run_dir: Path
    checkpoint: Path | None = None
    weights_file: Path | None = None

    def describe(self) -> str:
        return str(self.checkpoint or self.weights_file)


def resolve(path: str | os.PathLike, checkpoint_only: bool = False, best: bool = False) -> Source:
    """The weights `path` names: a weights file, a checkpoint folder, or a run folder (its
    model.pt, else its newest complete checkpoint; `checkpoint_only` skips model.pt, `best`
    takes `checkpoint.best_monitor`'s best checkpoint)."""
    path = Path(path)
    if path.is_file():
        if checkpoint_only:
            raise CheckpointError(f"{path}: a file, not a run folder or checkpoint folder")
        return Source(path.parent, weights_file=path)
    if (path / MANIFEST).exists() or (COMMITTED.fullmatch(path.name) and path.is_dir()):
        if best:
            raise CheckpointError(f"{path}: a checkpoint; --best takes the run folder")
        return Source(path.parent.parent, checkpoint=path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run folder, checkpoint or weights file")
    if best:
        return Source(path, checkpoint=_best_checkpoint(path))
    if not checkpoint_only and (path / weights.FINAL_WEIGHTS).is_file():
        return Source(path, weights_file=path / weights.FINAL_WEIGHTS)
    newest = Checkpointer(path, CheckpointConfig(), None).newest_valid()
    if newest is None:
        holds = (
            "no complete checkpoint"
            if checkpoint_only
            else "no model.pt and no complete checkpoint"
        )
        raise CheckpointError(f"{path}: holds {holds} (checkpoints/step_*)")
    return Source(path, checkpoint=newest)


def _best_checkpoint(run_dir: Path) -> Path:
    saved = _read_config(run_dir).checkpoint
    if not saved.best_monitor:
        raise CheckpointError(
            f"{run_dir}: keeps no best checkpoint (checkpoint.best_monitor was not set in its "
            f"{CONFIG})"
        )
    best = Checkpointer(run_dir, saved, None).best()
    if best is None:
        raise CheckpointError(
            f"{run_dir}: no complete checkpoint has a {saved.best_monitor} value to rank it by"
        )
    return best


def _read_config(run_dir: Path) -> Any:
    """The run's config.yaml on the train schema (unvalidated)."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: missing, so the run's data and model cannot be rebuilt")
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
    except Exception as err:  # a YAML error, or a value the schema refuses
        raise ConfigError(
            f"{path}: not a hooktrain run config ({' '.join(str(err).split())})"
        ) from None


def run_config(run_dir: Path, device: str | None = None) -> TrainConfig:
    """The run's config for one process that only evaluates: no parallelism, resume, callbacks,
    loggers or saving (none of them changes what the weights compute)."""
    cfg = _read_config(run_dir)
    cfg.parallel = OmegaConf.structured(ParallelConfig)
    cfg.checkpoint = OmegaConf.structured(CheckpointConfig(every_steps=0, save_final=False))
    cfg.callbacks, cfg.logger = {}, {}  # assigned: a merge would keep the run's entries
    cfg.merge_with({"resume": None, "schedule": None, "compile": False})
    if device is not None:
        cfg.device = device
    return validate(cfg, world_size=1)


def _given(
    cfg: TrainConfig, source: Source, command: str, model: Any, splits: Any
) -> tuple[Any, DataSplits | None]:
    """The model and splits handed in (`splits` as fit takes its `data`); ConfigError naming
    the node when the run's config.yaml records an object handed to fit that is not here."""
    for name, node, obj, keyword in (
        ("model", cfg.model, model, "model"),
        ("data.dataset", cfg.data.dataset, splits, "splits"),
    ):
        if node.get("_target_") == weights.GIVEN and obj is None:
            raise ConfigError(
                f"{name}: {source.run_dir / CONFIG} records a {node.get('type')} handed to "
                "trainer.api.fit as an object, which cannot be rebuilt; from Python: "
                f"trainer.commands.{command}(..., {keyword}=...)"
            )
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model: must be a torch.nn.Module; got a {type(model).__name__}")
    given_splits = as_splits(splits, "splits", model is None) if splits is not None else None
    return model, given_splits


def _loaded_trainer(
    source: Source, device: str | None, command: str, model: Any = None, splits: Any = None
) -> Any:
    """A Trainer built from the run's config (or the objects handed in) with the source's
    weights in its model."""
    from trainer.build import build_trainer  # the whole trainer: imported once input is checked

    cfg = run_config(source.run_dir, device)
    model, given_splits = _given(cfg, source, command, model, splits)
    if source.weights_file is not None:
        saved = weights.read_weights(source.weights_file)  # before building: a bad file is fast
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=pick_device(cfg.device, 0))
    trainer, _ = build_trainer(cfg, env, source.run_dir, model, given_splits)
    trainer.logger.finish()  # no logging here
    if source.checkpoint is not None:
        load_model_weights(source.checkpoint, trainer.model)
    else:
        try:
            trainer.model.load_state_dict(saved["state_dict"])
        except RuntimeError as err:
            raise CheckpointError(
                f"{source.weights_file}: does not fit the run's model ({' '.join(str(err).split())})"
            ) from None
    return trainer


def _loader(trainer: Any, split: str, source: Source) -> Any:
    if split not in SPLITS:
        raise ConfigError(f"--split: must be one of {', '.join(SPLITS)}, got {split!r}")
    loader = trainer.val_loader if split == "val" else trainer.test_loader
    if loader is None:
        raise ConfigError(f"--split: the data of {source.run_dir / CONFIG} has no {split} split")
    return loader


# ---------------------------------------------------------------------------------- commands
def evaluate(
    path: str | os.PathLike,
    split: str = "test",
    out: str | os.PathLike | None = None,
    device: str | None = None,
    *,
    model: torch.nn.Module | None = None,
    splits: Any = None,
) -> dict[str, float]:
    """Loss and accuracy of the weights `path` names on `split`, exactly as the fit measures
    them (every sample counted once); also written as JSON to `out` (default:
    `<run dir>/eval_<split>.json`). `model`, `splits`: the objects a run trained by
    `trainer.api.fit` was handed (see `fit`'s `model` and `data`)."""
    source = resolve(path)
    out = Path(out) if out is not None else source.run_dir / f"eval_{split}.json"
    if out.name == SUMMARY and out.parent.resolve() == source.run_dir.resolve():
        raise ConfigError(f"--out: {out} is the run's summary, which evaluate never overwrites")
    trainer = _loaded_trainer(source, device, "evaluate", model, splits)
    metrics = trainer.measure(_loader(trainer, split, source), split)
    result: dict[str, Any] = {**metrics, "weights": source.describe()}
    if source.checkpoint is not None:
        result["step"] = int(source.checkpoint.name.removeprefix("step_"))
    _write(out, (json.dumps(result, indent=2) + "\n").encode())
    return metrics


def predict(
    path: str | os.PathLike,
    out: str | os.PathLike,
    split: str | None = "test",
    data: str | os.PathLike | None = None,
    device: str | None = None,
    *,
    model: torch.nn.Module | None = None,
    splits: Any = None,
) -> dict[str, torch.Tensor]:
    """The model's logits and argmax for every sample of `split` (in the dataset's order, with
    its targets) or of `data` (a .pt file of one input tensor, samples along dim 0); saved to
    `out` with torch.save and returned. `model`, `splits`: as for `evaluate`."""
    source = resolve(path)
    inputs = _read_inputs(Path(data)) if data is not None else None
    trainer = _loaded_trainer(source, device, "predict", model, splits)
    if inputs is not None:
        _check_inputs(inputs, trainer.state.train_data[0][0], Path(data))
        size = trainer.cfg.data.eval_batch_size
        batches = [(chunk, None) for chunk in inputs.split(size)]
    else:
        batches = _loader(trainer, split or "test", source)
    model, logits, targets = trainer.model.eval(), [], []
    with torch.no_grad():
        for x, y in batches:
            with trainer._autocast():  # the precision the fit evaluated in
                logits.append(model(x.to(trainer.env.device)).float().cpu())
            if y is not None:
                targets.append(y)
    result = {"logits": torch.cat(logits)}
    result["predictions"] = result["logits"].argmax(-1)
    if targets:
        result["targets"] = torch.cat(targets)
    _save(out, result)
    return result


def export(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    best: bool = False,
    device: str | None = None,
    *,
    model: torch.nn.Module | None = None,
    splits: Any = None,
) -> Path:
    """A plain weights file (trainer/export.py) from a checkpoint: the one `path` names, a run's
    newest, or (`best`) its `checkpoint.best_monitor` best; default `out`:
    `<run dir>/best_model.pt` or `<run dir>/model_step_<N>.pt`. `model`, `splits`: as for
    `evaluate`."""
    source = resolve(path, checkpoint_only=True, best=best)
    name = weights.BEST_WEIGHTS if best else f"model_{source.checkpoint.name}.pt"
    out = Path(out) if out is not None else source.run_dir / name
    cfg = run_config(source.run_dir, device)
    model, given_splits = _given(cfg, source, "export", model, splits)
    from trainer.build import build_data, build_model

    data = given_splits or build_data(cfg)
    model = model if model is not None else build_model(cfg, data)
    load_model_weights(source.checkpoint, model)
    return weights.write_weights(
        model, out, weights.model_spec(cfg, data.input_shape, data.num_classes)
    )


# ---------------------------------------------------------------------------------- files
def _read_inputs(path: Path) -> torch.Tensor:
    try:
        inputs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated, or refused by the weights-only unpickler
        raise ConfigError(
            f"--data: {path}: not a tensor file torch.load can read ({weights.load_failure(err)})"
        ) from None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or not len(inputs):
        held = type(inputs).__name__ if not isinstance(inputs, torch.Tensor) else "an empty tensor"
        raise ConfigError(
            f"--data: {path}: must hold one tensor of inputs, samples along dim 0; it holds {held}"
        )
    return inputs


def _check_inputs(inputs: torch.Tensor, sample: torch.Tensor, path: Path) -> None:
    """Inputs shaped and typed as the run's training inputs, or a ConfigError saying both (the
    model's own error would be a traceback from deep inside its forward)."""
    if inputs.shape[1:] != sample.shape or inputs.dtype != sample.dtype:
        raise ConfigError(
            f"--data: {path}: samples of shape {tuple(inputs.shape[1:])} and dtype "
            f"{inputs.dtype}; the run trained on {tuple(sample.shape)} and {sample.dtype}"
        )


def _save(path: str | os.PathLike, obj: Any) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write(Path(path), buffer.getvalue())


def _write(path: Path, data: bytes) -> None:
    from trainer.checkpoint import _write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data)


# ---------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error as a ConfigError (one line, exit code 2) instead
    of the usage text and its own line. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message.removeprefix("argument "))


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="hooktrain", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    where = "a run folder, a checkpoint folder (<run>/checkpoints/step_N) or a weights file"
    device = {"choices": ("auto", "cpu", "cuda"), "help": "default: the run's own"}

    ev = commands.add_parser("evaluate", help="loss and accuracy on a split")
    ev.add_argument("path", help=where)
    ev.add_argument("--split", choices=SPLITS, default="test")
    ev.add_argument("--out", help="JSON file (default: <run dir>/eval_<split>.json)")
    ev.add_argument("--device", **device)

    pr = commands.add_parser("predict", help="logits and argmax for every sample")
    pr.add_argument("path", help=where)
    given = pr.add_mutually_exclusive_group()
    given.add_argument("--split", choices=SPLITS, default="test")
    given.add_argument("--data", help="a .pt file of one input tensor (samples along dim 0)")
    pr.add_argument("--out", required=True, help="where torch.save writes the predictions")
    pr.add_argument("--device", **device)

    ex = commands.add_parser("export", help="a plain weights file from a checkpoint")
    ex.add_argument("path", help="a run folder or a checkpoint folder")
    ex.add_argument("--best", action="store_true", help="checkpoint.best_monitor's best")
    ex.add_argument("--out", help="default: <run dir>/best_model.pt or model_step_<N>.pt")
    ex.add_argument("--device", **device)
    return top


def main(argv: list[str] | None = None) -> None:
    try:
        args = parser().parse_args(argv)
        if args.command == "evaluate":
            metrics = evaluate(args.path, args.split, args.out, args.device)
            print(json.dumps(metrics))
        elif args.command == "predict":
            result = predict(args.path, args.out, args.split, args.data, args.device)
            print(f"hooktrain: {len(result['logits'])} predictions written to {args.out}")
        else:
            print(
                f"hooktrain: weights written to {export(args.path, args.out, args.best, args.device)}"
            )
    except (ConfigError, CheckpointError) as err:
        from trainer.cli import _exit

        _exit(err, say=True)


if __name__ == "__main__":
    main(sys.argv[1:])
