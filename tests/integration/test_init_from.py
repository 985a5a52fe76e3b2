"""`init_from`: a new run starts from an earlier run's model weights (its best checkpoint, else its
newest complete one, else its model.pt; or a checkpoint folder or weights file named directly),
loaded through the safe readers, checked name by name, and refused in one line when they do
not fit. Real fits, real files: the source run is trained here, and each loaded model is
compared with the same weights read back independently."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import ENV, make_config
from trainer.build import build_trainer
from trainer.checkpoint import CheckpointError, load_model_weights
from trainer.checkpoint_reader import committed
from trainer.config import ConfigError
from trainer.export import write_final_weights
from trainer.run_folder import record_config

CNN = {"_target_": "trainer.models.CNN", "channels": [4], "hidden": 8}
SHAPE = {"input_shape": [1, 16]}
STEPS_PER_EPOCH = 8  # 256 training samples in batches of 32


def _source_run(run_dir: Path):
    """A trained run as `hooktrain` leaves it: config.yaml, checkpoints at every epoch's end
    (scored by val/accuracy; `min`, so that the "best" is an early one, not the newest), and
    model.pt. Returns its trainer."""
    cfg = make_config(
        model=CNN,
        dataset=SHAPE,
        optim={"_target_": "torch.optim.SGD", "lr": 0.3},
        max_epochs=3,
        checkpoint={
            "every_steps": STEPS_PER_EPOCH,
            "save_final": True,
            "keep_last": 2,
            "best_monitor": "val/accuracy",
            "best_mode": "min",
        },
    )
    trainer, _ = build_trainer(cfg, ENV, run_dir)
    trainer.fit()
    trainer.logger.finish()
    write_final_weights(trainer, run_dir)
    record_config(run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    return trainer


def _started_from(init_from: Path, run_dir: Path, **overrides):
    cfg = make_config(model=CNN, dataset=SHAPE, init_from=str(init_from), **overrides)
    trainer, _ = build_trainer(cfg, ENV, run_dir)
    return trainer


def _weights_of(source: Path, like: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights at `source` read back independently of init_from: DCP's verified loader for a
    checkpoint, torch.load for a weights file."""
    model = copy.deepcopy(like)
    if source.is_dir():
        load_model_weights(source, model)
        return model.state_dict()
    return torch.load(source, weights_only=True)["state_dict"]


def test_init_from_takes_the_best_then_the_newest_checkpoint_then_model_pt(tmp_path, caplog):
    source = _source_run(tmp_path / "source")
    steps = committed(source.checkpointer.root)
    best, newest = source.checkpointer.best(), steps[-1]
    assert best is not None and best != newest  # the run's own ranking picks an early one
    # The same run three ways: as it is (a best kept), without its config (no best known), and
    # without checkpoints (only model.pt).
    no_config = tmp_path / "no_config"
    shutil.copytree(tmp_path / "source", no_config)
    (no_config / "config.yaml").unlink()
    weights_only = tmp_path / "weights_only"
    shutil.copytree(no_config, weights_only)
    shutil.rmtree(weights_only / "checkpoints")
    cases = [
        (tmp_path / "source", best, "the run's best checkpoint"),
        (no_config, no_config / "checkpoints" / newest.name, "newest complete checkpoint"),
        (weights_only, weights_only / "model.pt", "final weights"),
        (newest, newest, "a checkpoint"),
        (tmp_path / "source" / "model.pt", tmp_path / "source" / "model.pt", "a weights file"),
    ]
    plain = source.model
    for number, (init_from, expected, why) in enumerate(cases):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hooktrain"):
            trainer = _started_from(init_from, tmp_path / f"new{number}")
        [line] = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
        assert str(expected) in line and why in line, line
        reference = _weights_of(expected, plain)
        loaded = trainer.model.state_dict()
        assert loaded.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(loaded[name], tensor), f"{init_from}: {name}"
    # A new run, not a resume: step 0, a fresh optimizer, its own folder, and it trains its own
    # budget of steps.
    assert trainer.state.step == 0 and not trainer.optimizer.state
    assert not (tmp_path / "new4" / "checkpoints").exists()
    state = trainer.fit()
    trainer.logger.finish()
    assert state.step == 2 * STEPS_PER_EPOCH


def test_init_from_refuses_weights_that_do_not_fit_in_one_line_naming_file_and_key(tmp_path):
    source = _source_run(tmp_path / "source")
    newest = committed(source.checkpointer.root)[-1]
    weights = tmp_path / "source" / "model.pt"
    extra = tmp_path / "extra.pt"
    saved = torch.load(weights, weights_only=True)
    saved["state_dict"]["head.extra"] = torch.zeros(3)
    torch.save(saved, extra)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(weights.read_bytes()[:100])
    damaged = tmp_path / "damaged" / newest.name
    shutil.copytree(newest, damaged)
    data = next(damaged.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-8])
    wider = {**CNN, "hidden": 16}
    first_fc = next(k for k, v in source.model.state_dict().items() if v.shape[0] == 8)
    cases = [
        (tmp_path / "nowhere", {}, ["nowhere", "no such run folder"]),
        (newest, {"model": wider}, [str(newest), first_fc, "[8,", "[16,"]),
        (weights, {"model": wider}, [str(weights), first_fc]),
        (extra, {}, [str(extra), "head.extra", "which the model lacks"]),
        (junk, {}, [str(junk), "not a weights file"]),
        (damaged, {}, [str(data), "checksum mismatch"]),
    ]
    for number, (init_from, overrides, named) in enumerate(cases):
        run_dir = tmp_path / f"refused{number}"
        run_dir.mkdir()
        cfg = make_config(dataset=SHAPE, init_from=str(init_from), **{"model": CNN, **overrides})
        with pytest.raises(CheckpointError) as refused:
            build_trainer(cfg, ENV, run_dir)
        message = str(refused.value)
        assert "\n" not in message and message.startswith("init_from: "), message
        for part in named:
            assert part in message, (part, message)
        assert not any(run_dir.iterdir())  # refused before anything was written


def test_init_from_and_resume_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^init_from: .*resume=auto"):
        make_config(init_from=str(tmp_path), resume="auto")
    with pytest.raises(ConfigError, match=r"^max_epochs: must be >= 0"):
        make_config(max_epochs=-1)
