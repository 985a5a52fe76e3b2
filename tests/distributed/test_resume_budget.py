"""The budget of a resumed fit is the same epochs (or steps) whatever the world size: a checkpoint
saved by two real ranks (DDP over gloo, through the CLI's own multi-process path) resumed in one
process, where an epoch has twice the steps."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.helpers

from tests.helpers import make_config, make_trainer  # noqa: E402
from trainer.callbacks.base import Callback  # noqa: E402
from trainer.cli import _launched_job  # noqa: E402
from trainer.config import ParallelConfig  # noqa: E402
from trainer.distributed.launch import launch  # noqa: E402
from trainer.state import TrainState  # noqa: E402


class Budget(Callback):
    """The budget as callbacks (LR schedules, the progress bar) see it when the fit starts."""

    def on_fit_start(self, state: TrainState) -> None:
        self.start_step, self.max_steps = state.step, state.max_steps


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_resume_on_another_world_size_keeps_the_epoch_budget(tmp_path):
    two_ranks = make_config(
        parallel=ParallelConfig(strategy="ddp", backend="gloo", timeout_s=20),
        checkpoint={"save_final": True},
        max_epochs=2,
    )
    container = OmegaConf.to_container(OmegaConf.structured(two_ranks))
    saved = launch(_launched_job, 2, container, str(tmp_path), time.time())[0]
    assert saved["world_size"] == 2 and saved["epochs"] == 2
    folder = tmp_path / "checkpoints" / f"step_{saved['steps']:08d}"

    # One process, one more epoch: that epoch has this world size's steps.
    budget = Budget()
    resumed = make_trainer(tmp_path, max_epochs=3, resume=str(folder), callbacks=[budget])
    one_epoch = resumed.state.steps_per_epoch
    assert one_epoch == 2 * saved["steps"] // saved["epochs"]  # twice a two-rank epoch's steps
    state = resumed.fit()
    assert (state.epoch, state.step) == (3, saved["steps"] + one_epoch)
    assert (budget.start_step, budget.max_steps) == (saved["steps"], state.step)

    # A step budget is the same number of steps whatever the world size.
    resumed = make_trainer(tmp_path, max_steps=saved["steps"] + 3, resume=str(folder))
    assert resumed.fit().step == saved["steps"] + 3
