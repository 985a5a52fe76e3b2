"""`TorchScheduler`: torch's own schedulers through a real Trainer, against the same scheduler
stepped in a plain loop over a torch optimizer, and across a resume from a checkpoint.

The trainer runs the MLP of tests/helpers.py (SGD, lr 0.1, momentum 0.9; 8 steps an epoch). Its
rate (and momentum, which OneCycleLR cycles) before every step is recorded and compared with `==`
to a plain loop that steps the same torch scheduler on an SGD optimizer with the same settings:
`optimizer.step(); scheduler.step()` per step, or at each epoch's end, or
`scheduler.step(val_loss)` after each validation with the run's own validation losses.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as torch_lr

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.helpers

from hydra import compose, initialize_config_dir  # noqa: E402

import trainer.cli  # noqa: E402
from tests.helpers import SGD, make_trainer  # noqa: E402
from trainer.callbacks.base import Callback  # noqa: E402
from trainer.callbacks.torch_schedule import TorchScheduler  # noqa: E402
from trainer.config import (
    ConfigError,  # noqa: E402
    validate,  # noqa: E402
)
from trainer.loop import Trainer  # noqa: E402
from trainer.state import TrainState, rate_metrics  # noqa: E402

STEPS_PER_EPOCH = 8  # 256 training samples in batches of 32
ALLOWED = ["trainer.", "torch.optim.", "torch.nn."]


def sched(name: str, **arguments: Any) -> dict[str, Any]:
    """A scheduler node as a config writes it."""
    return {"_target_": f"torch.optim.lr_scheduler.{name}", "_partial_": True, **arguments}


Reference = Callable[[torch.optim.Optimizer, int], torch_lr.LRScheduler]  # (optimizer, length)

# name: (scheduler node, reference scheduler, interval, epochs)
CASES: dict[str, tuple[dict[str, Any], Reference, str, int]] = {
    "StepLR": (
        sched("StepLR", step_size=5, gamma=0.5),
        lambda o, n: torch_lr.StepLR(o, step_size=5, gamma=0.5),
        "step",
        3,
    ),
    "MultiStepLR": (
        sched("MultiStepLR", milestones=[3, 10, 17], gamma=0.3),
        lambda o, n: torch_lr.MultiStepLR(o, milestones=[3, 10, 17], gamma=0.3),
        "step",
        3,
    ),
    "ExponentialLR-epoch": (
        sched("ExponentialLR", gamma=0.7),
        lambda o, n: torch_lr.ExponentialLR(o, gamma=0.7),
        "epoch",
        4,
    ),
    "CosineAnnealingLR": (
        sched("CosineAnnealingLR", T_max="auto", eta_min=0.01),
        lambda o, n: torch_lr.CosineAnnealingLR(o, T_max=n, eta_min=0.01),
        "step",
        3,
    ),
    "CosineAnnealingWarmRestarts": (
        sched("CosineAnnealingWarmRestarts", T_0=4, T_mult=2, eta_min=0.005),
        lambda o, n: torch_lr.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2, eta_min=0.005),
        "step",
        3,
    ),
    "LinearLR": (
        sched("LinearLR", start_factor=0.25, end_factor=1.0, total_iters=10),
        lambda o, n: torch_lr.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=10),
        "step",
        3,
    ),
    "PolynomialLR-epoch": (
        sched("PolynomialLR", total_iters="auto", power=2.0),
        lambda o, n: torch_lr.PolynomialLR(o, total_iters=n, power=2.0),
        "epoch",
        4,
    ),
    "SequentialLR": (
        sched(
            "SequentialLR",
            schedulers=[
                sched("LinearLR", start_factor=0.1, total_iters="auto"),
                sched("CosineAnnealingLR", T_max="auto", eta_min=0.001),
            ],
            milestones=[6],
        ),
        lambda o, n: torch_lr.SequentialLR(
            o,
            [
                torch_lr.LinearLR(o, start_factor=0.1, total_iters=6),
                torch_lr.CosineAnnealingLR(o, T_max=n - 6, eta_min=0.001),
            ],
            milestones=[6],
        ),
        "step",
        3,
    ),
    "ChainedScheduler": (
        sched(
            "ChainedScheduler",
            schedulers=[
                sched("LinearLR", start_factor=0.5, total_iters=4),
                sched("ExponentialLR", gamma=0.9),
            ],
        ),
        lambda o, n: torch_lr.ChainedScheduler(
            [torch_lr.LinearLR(o, start_factor=0.5, total_iters=4), torch_lr.ExponentialLR(o, 0.9)]
        ),
        "step",
        3,
    ),
    "OneCycleLR-three-phase": (
        sched("OneCycleLR", max_lr=0.5, total_steps="auto", three_phase=True),
        lambda o, n: torch_lr.OneCycleLR(o, max_lr=0.5, total_steps=n, three_phase=True),
        "step",
        3,
    ),
    "ReduceLROnPlateau-abs": (
        sched("ReduceLROnPlateau", threshold_mode="abs", threshold=0.3, patience=0, factor=0.5),
        lambda o, n: torch_lr.ReduceLROnPlateau(
            o, threshold_mode="abs", threshold=0.3, patience=0, factor=0.5
        ),
        "step",
        6,
    ),
    "ReduceLROnPlateau-rel": (
        sched("ReduceLROnPlateau", threshold_mode="rel", threshold=0.4, patience=0, factor=0.5),
        lambda o, n: torch_lr.ReduceLROnPlateau(
            o, threshold_mode="rel", threshold=0.4, patience=0, factor=0.5
        ),
        "step",
        6,
    ),
}


class Recorder(Callback):
    """The rate and momentum before each step (after the schedule, which runs first), and the
    validation losses."""

    def __init__(self) -> None:
        self.values: list[tuple[float, float]] = []
        self.val_losses: list[float] = []

    def on_step_start(self, state: TrainState) -> None:
        group = state.optimizer.param_groups[0]
        self.values.append((group["lr"], group["momentum"]))

    def on_eval_end(self, state: TrainState) -> None:
        self.val_losses.append(state.metrics["val/loss"])


def _fit(run_dir: Path, name: str, **top: Any) -> tuple[Trainer, Recorder]:
    node, _, interval, epochs = CASES[name]
    monitor = {"monitor": "val/loss"} if "Plateau" in name else {}
    schedule = {
        "_target_": "trainer.callbacks.torch_schedule.TorchScheduler",
        "scheduler": node,
        "interval": interval,
        **monitor,
    }
    recorder = Recorder()
    checkpoint = {"every_steps": 10, "keep_last": 10}
    trainer = make_trainer(
        run_dir, callbacks=[recorder], schedule=schedule,
        checkpoint=checkpoint, **{"max_epochs": epochs, **top},
    )  # fmt: skip
    trainer.fit()
    return trainer, recorder


def _plain_loop(name: str, val_losses: list[float]) -> list[tuple[float, float]]:
    """The same scheduler on a plain torch optimizer, stepped as torch's docs step it."""
    _, make, interval, epochs = CASES[name]
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=SGD["lr"], momentum=SGD["momentum"])
    total = epochs * STEPS_PER_EPOCH
    scheduler = make(optimizer, total if interval == "step" else epochs)
    values = []
    for step in range(total):
        group = optimizer.param_groups[0]
        values.append((group["lr"], group["momentum"]))
        optimizer.step()
        epoch_end, epoch = (step + 1) % STEPS_PER_EPOCH == 0, step // STEPS_PER_EPOCH
        if isinstance(scheduler, torch_lr.ReduceLROnPlateau):
            if epoch_end:
                scheduler.step(val_losses[epoch])
        elif interval == "step" or epoch_end:
            scheduler.step()
    return values


@pytest.mark.parametrize("name", CASES)
def test_torch_scheduler_gives_torchs_values_and_resumes_exactly(tmp_path, name):
    _, whole = _fit(tmp_path / "whole", name)
    assert whole.values == _plain_loop(name, whole.val_losses)
    assert len({lr for lr, _ in whole.values}) >= 3  # the case exercises the schedule

    _, resumed = _fit(
        tmp_path / "resumed", name, resume=str(tmp_path / "whole/checkpoints/step_00000010")
    )
    assert resumed.values == whole.values[10:]
    assert resumed.val_losses == whole.val_losses[1:]  # the first validation came before step 10


@pytest.mark.parametrize("name", ["OneCycleLR-three-phase", "CosineAnnealingLR"])
def test_a_fit_of_no_steps_builds_its_schedule_and_ends(tmp_path, name):
    # max_epochs=0 (init_from, only the fit-end stages): OneCycleLR refused a length of 0
    trainer, recorder = _fit(tmp_path, name, max_epochs=0)
    assert trainer.state.step == 0 and recorder.values == []
    assert trainer.callbacks[0].state_dict()["scheduler"]["last_epoch"] == 0


def test_plateau_does_not_count_the_test_split_evaluated_after_fit(tmp_path):
    trainer, _ = _fit(tmp_path, "ReduceLROnPlateau-rel")
    saved, rates = trainer.callbacks[0].state_dict(), rate_metrics(trainer.optimizer)
    assert trainer.test()["test/loss"] > 0
    assert trainer.callbacks[0].state_dict() == saved
    assert rate_metrics(trainer.optimizer) == rates


def test_rates_are_logged_at_fit_start_and_after_each_epoch_step(tmp_path):
    logged: list[tuple[int, float]] = []

    class Logged(Callback):  # after the schedule: sees what it logged in the same hook
        def on_fit_start(self, state: TrainState) -> None:
            logged.append((state.step, state.unlogged["lr"]))

        def on_epoch_end(self, state: TrainState) -> None:
            logged.append((state.step, state.unlogged["lr"]))

    schedule = {
        "_target_": "trainer.callbacks.torch_schedule.TorchScheduler",
        "scheduler": sched("StepLR", step_size=1, gamma=0.5),
        "interval": "epoch",
    }
    trainer = make_trainer(tmp_path, callbacks=[Logged()], schedule=schedule, max_epochs=2)
    trainer.fit()
    assert logged == [(0, SGD["lr"]), (8, SGD["lr"] / 2), (16, SGD["lr"] / 4)]


# ------------------------------------------------------------------------ bad input

NESTED_PLATEAU = sched(
    "SequentialLR",
    schedulers=[sched("StepLR", step_size=2), sched("ReduceLROnPlateau")],
    milestones=[3],
)
NESTED_NOT_A_SCHEDULER = sched(
    "SequentialLR",
    schedulers=[sched("StepLR", step_size=2), {"_target_": "torch.nn.Linear", "_partial_": True}],
    milestones=[3],
)
BAD_NODES = {
    "not-a-scheduler": ({"scheduler": {"_target_": "torch.optim.SGD", "_partial_": True}}, "s.scheduler._target_", "torch.optim.SGD is not a learning-rate scheduler"),
    "not-allowed": ({"scheduler": {"_target_": "os.system", "_partial_": True}}, "s.scheduler._target_", "outside the allowed"),
    "not-partial": ({"scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 3}}, "s.scheduler", "_partial_: true"),
    "no-target": ({"scheduler": {"_partial_": True, "step_size": 3}}, "s.scheduler", "_partial_: true"),
    "unknown-key": ({"scheduler": sched("StepLR", step_size=3, gama=0.5)}, "s.scheduler.gama", "unknown key"),
    "wrong-type": ({"scheduler": sched("StepLR", step_size="3")}, "s.scheduler.step_size", "expected int"),
    "auto-not-a-length": ({"scheduler": sched("StepLR", step_size="auto")}, "s.scheduler.step_size", "expected int"),
    "optimizer-set": ({"scheduler": sched("StepLR", step_size=3, optimizer="adam")}, "s.scheduler.optimizer", "set by the trainer"),
    "nested-not-a-scheduler": ({"scheduler": NESTED_NOT_A_SCHEDULER}, "s.scheduler.schedulers[1]._target_", "not a learning-rate scheduler"),
    "nested-plateau": ({"scheduler": NESTED_PLATEAU}, "s.scheduler.schedulers[1]._target_", "SequentialLR cannot step ReduceLROnPlateau"),
    "nested-unknown-key": ({"scheduler": sched("ChainedScheduler", schedulers=[sched("StepLR", stepsize=2)])}, "s.scheduler.schedulers[0].stepsize", "unknown key"),
    "interval": ({"scheduler": sched("StepLR", step_size=3), "interval": "batch"}, "s.interval", "must be step or epoch"),
    "plateau-without-monitor": ({"scheduler": sched("ReduceLROnPlateau")}, "s.monitor", "needs the metric"),
    "monitor-without-plateau": ({"scheduler": sched("StepLR", step_size=3), "monitor": "val/loss"}, "s.monitor", "StepLR reads no metric"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_NODES)
def test_config_check_refuses_a_bad_node_naming_the_key(case):
    node, key, fragment = BAD_NODES[case]
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: .*{re.escape(fragment)}"):
        TorchScheduler.check_config(node, "s", ALLOWED)


def test_config_check_accepts_nested_nodes_auto_and_a_monitor():
    for name in ("SequentialLR", "ChainedScheduler", "ReduceLROnPlateau-abs"):
        monitor = {"monitor": "val/loss"} if "Plateau" in name else {}
        TorchScheduler.check_config({"scheduler": CASES[name][0], **monitor}, "s", ALLOWED)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"scheduler": partial(torch.optim.SGD)}, "schedule.scheduler._target_: torch.optim.sgd.SGD is not"),
        ({"scheduler": partial(torch_lr.StepLR), "interval": "batch"}, "schedule.interval"),
        ({"scheduler": partial(torch_lr.ReduceLROnPlateau)}, "schedule.monitor"),
        ({"scheduler": partial(torch_lr.StepLR), "monitor": "val/loss"}, "schedule.monitor"),
    ],
    ids=["not-a-scheduler", "interval", "plateau-without-monitor", "monitor-without-plateau"],
)  # fmt: skip
def test_bad_arguments_are_refused_when_built(arguments, fragment):
    # What Hydra hands over when a config skipped validation (e.g. built by hand).
    with pytest.raises(ConfigError, match=f"^{re.escape(fragment)}"):
        TorchScheduler(**arguments)


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        (
            "schedule.scheduler._target_=torch.optim.SGD",
            "schedule.scheduler._target_",
            "is not a learning-rate scheduler",
        ),
        (
            "schedule.scheduler.schedulers.1.T_max=many",
            "schedule.scheduler.schedulers[1].T_max",
            "expected int",
        ),
        (
            "+schedule.scheduler.schedulers.0.start=0.1",
            "schedule.scheduler.schedulers[0].start",
            "unknown key",
        ),
    ],
)
def test_validation_refuses_a_bad_scheduler_node_naming_its_key(override, key, fragment):
    with initialize_config_dir(config_dir=str(trainer.cli.recipes_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["schedule=torch_warmup_cosine", override])
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: .*{re.escape(fragment)}"):
        validate(cfg)
