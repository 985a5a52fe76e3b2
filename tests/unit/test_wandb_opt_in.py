"""wandb is opt-in: off in the default logger list, on with `+logger=wandb`, and on by itself
where the user has configured wandb (WANDB_API_KEY set), for the command and the Python API
alike. Real Hydra composition of `recipes/`; the keys are fake and nothing is started here (the
offline run the key turns on is in tests/integration/test_cli.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from trainer.api import compose_config
from trainer.cli import WANDB_ON, configured_wandb
from trainer.config import validate

KEY = "fake-key-never-sent"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # a developer's own key stays out


def loggers(overrides=(), config=None) -> dict:
    return OmegaConf.to_container(compose_config(config, list(overrides)).logger, resolve=True)


def test_the_default_loggers_leave_wandb_out_and_plus_logger_wandb_adds_it():
    assert list(loggers()) == ["tensorboard", "jsonl"]
    on = loggers([WANDB_ON])
    assert list(on) == ["tensorboard", "jsonl", "wandb"]
    assert on["wandb"]["mode"] == "offline"  # WANDB_MODE=offline in the tests
    assert list(loggers(["logger=[tensorboard,jsonl,wandb]"])) == list(on)
    validate(compose_config(None, [WANDB_ON]))


def test_a_wandb_key_turns_it_on_unless_the_loggers_are_chosen(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert list(loggers()) == ["tensorboard", "jsonl", "wandb"]
    assert list(loggers(["logger=[tensorboard,jsonl]"])) == ["tensorboard", "jsonl"]
    assert loggers(["logger=none"]) == {}
    assert list(loggers([WANDB_ON])) == ["tensorboard", "jsonl", "wandb"]  # not added twice
    # A config of the user's own names its loggers (here none).
    own = tmp_path / "my.yaml"
    own.write_text("defaults:\n  - train\n  - override logger: none\n  - _self_\n")
    assert loggers(config=own) == {}
    # The command's own flags are not overrides; a sweep of logger lists is a choice.
    assert configured_wandb(["-m", "optim.lr=1e-3,3e-3"]) == ["-m", "optim.lr=1e-3,3e-3", WANDB_ON]
    assert configured_wandb(["-m", "logger=none,[jsonl]"]) == ["-m", "logger=none,[jsonl]"]
    assert configured_wandb(["model=mlp"], own_config=True) == ["model=mlp"]
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb's own switch: off
    assert list(loggers()) == ["tensorboard", "jsonl"]


def test_wandb_runs_in_the_mode_wandb_mode_names(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    assert loggers([WANDB_ON])["wandb"]["mode"] == "online"
    monkeypatch.delenv("WANDB_MODE")
    assert loggers([WANDB_ON])["wandb"]["mode"] == "offline"
    assert loggers([WANDB_ON, "logger.wandb.mode=online"])["wandb"]["mode"] == "online"
