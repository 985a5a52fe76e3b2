"""Checkpoints of two real ranks (gloo, through `trainer.distributed.launch`): a background save
(`checkpoint.async_save`) under DDP and FSDP2 completes and is identical to a synchronous one and
resumable; a 2-rank checkpoint without one rank's RNG file is damage; and when one rank can use
no checkpoint, every rank stops."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.helpers

import trainer.checkpoint as checkpoint_module  # noqa: E402
from tests.faults import WeightWatch  # noqa: E402
from tests.helpers import ADAMW, make_config, make_trainer  # noqa: E402
from trainer.build import build_trainer  # noqa: E402
from trainer.checkpoint import MANIFEST, TRAINER_STATE, CheckpointError, verify  # noqa: E402
from trainer.config import ParallelConfig  # noqa: E402
from trainer.distributed.env import distributed  # noqa: E402
from trainer.distributed.launch import launch  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

EVERY, STEPS = 4, 8  # 2 ranks x 32 samples: 4 steps an epoch, so a save at every epoch's end
RUN = {"optim": ADAMW, "model": {"dropout": 0.3}, "max_steps": STEPS}


def _fit(env: Any, run_dir: Path, strategy: str, async_save: bool, resume: str | None = None):
    cfg = make_config(
        parallel=ParallelConfig(strategy=strategy, backend="gloo", timeout_s=30),
        checkpoint={"every_steps": EVERY, "keep_last": 3, "async_save": async_save},
        resume=resume,
        **RUN,
    )
    trainer, _ = build_trainer(cfg, env, run_dir)
    trainer.fit()
    return trainer


def _worker(base: str, strategy: str) -> str | None:
    """Background saves, synchronous saves, a resume from a background save's first checkpoint;
    under DDP also a resume=auto where rank 1 alone finds every checkpoint damaged."""
    base = Path(base)
    with distributed("cpu", "gloo", 30) as env:
        _fit(env, base / "async", strategy, async_save=True)
        _fit(env, base / "sync", strategy, async_save=False)
        first = base / "async" / "checkpoints" / f"step_{EVERY:08d}"
        _fit(env, base / "resumed", strategy, async_save=True, resume=str(first))
        if strategy != "ddp":
            return None
        if env.rank == 1:

            def damaged(folder: Path) -> dict[str, Any]:
                raise CheckpointError(f"{folder / MANIFEST}: checksum mismatch (simulated)")

            checkpoint_module.verify = damaged
        try:
            _fit(env, base / "sync", strategy, async_save=False, resume="auto")
        except CheckpointError as err:
            return str(err)
        return None


def _contents(folder: Path, scratch: Path) -> dict[str, Any]:
    """A checkpoint's model, optimizer and loop state (DCP's own converter, our own files)."""
    target = scratch / f"{folder.parent.parent.name}_{folder.name}.pt"
    dcp_to_torch_save(folder, target)
    state = torch.load(folder / TRAINER_STATE, weights_only=True)["state"]
    # The losses, not the throughput (a measured time)
    state["metrics"] = {k: v for k, v in state["metrics"].items() if k.endswith("/loss")}
    return {"dcp": torch.load(target, weights_only=True), "state": state}


def _assert_equal(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_equal(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_equal(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """`two_rank_runs(strategy)`: (run folders, what `_worker` returned by rank), launched once
    per strategy for the whole module."""
    launched: dict[str, tuple[Path, dict[int, Any]]] = {}

    def runs(strategy: str) -> tuple[Path, dict[int, Any]]:
        if strategy not in launched:
            base = tmp_path_factory.mktemp(strategy)
            launched[strategy] = base, launch(_worker, 2, str(base), strategy)
        return launched[strategy]

    return runs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_async_save_completes_and_matches_a_sync_save(two_rank_runs, strategy, tmp_path):
    base, _ = two_rank_runs(strategy)
    steps = [f"step_{s:08d}" for s in range(EVERY, STEPS + 1, EVERY)]
    for run in ("async", "sync", "resumed"):
        folders = sorted(p.name for p in (base / run / "checkpoints").iterdir())
        wanted = steps if run != "resumed" else steps[1:]
        assert folders == wanted, run
        for name in folders:
            manifest = verify(base / run / "checkpoints" / name)
            assert manifest["world_size"] == 2 and "rng_rank1.pt" in manifest["files"]
    for name in steps:
        _assert_equal(
            _contents(base / "async" / "checkpoints" / name, tmp_path),
            _contents(base / "sync" / "checkpoints" / name, tmp_path),
            name,
        )
    # Resumed from the background save of step 4, the run reached the synchronous run's step 8.
    _assert_equal(
        _contents(base / "resumed" / "checkpoints" / steps[-1], tmp_path),
        _contents(base / "sync" / "checkpoints" / steps[-1], tmp_path),
        "resumed",
    )


def test_one_rank_without_a_usable_checkpoint_stops_every_rank(two_rank_runs):
    base, errors = two_rank_runs("ddp")
    root = base / "sync" / "checkpoints"
    assert re.search(r"no usable checkpoint.*checksum mismatch \(simulated\)", errors[1])
    assert errors[0].startswith(f"{root}: resume=auto found no usable checkpoint")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000008"]


def test_two_rank_checkpoint_without_rank1_rng_is_damaged(two_rank_runs, tmp_path):
    base, _ = two_rank_runs("ddp")
    run_dir = tmp_path / "run"
    shutil.copytree(base / "sync", run_dir)
    newest = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    (newest / "rng_rank1.pt").unlink()
    manifest = json.loads((newest / MANIFEST).read_text())
    del manifest["files"]["rng_rank1.pt"]
    (newest / MANIFEST).write_text(json.dumps(manifest))
    culprit = re.escape(str(newest / "rng_rank1.pt"))

    with pytest.raises(CheckpointError, match=culprit):
        make_trainer(run_dir, resume=str(newest), data={"batch_size": 64}, **RUN).fit()
    # One process with the same global batch (64) takes the older step 4 instead.
    watch = WeightWatch()
    resumed = make_trainer(
        run_dir, resume="auto", data={"batch_size": 64}, callbacks=[watch], **RUN
    )
    with pytest.warns(RuntimeWarning, match=culprit):
        resumed.fit()
    assert watch.start_step == EVERY
