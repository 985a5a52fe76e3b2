"""Checkpoints (`trainer.checkpoint`): the folder layout and manifest, verification of damaged
folders, choosing the newest valid one, retention, and exact mid-epoch resume compared with an
uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.helpers

from tests.helpers import ADAMW, StepLosses, clone_model, make_trainer  # noqa: E402
from trainer.callbacks.base import Callback  # noqa: E402
from trainer.callbacks.dropout_schedule import DropoutSchedule  # noqa: E402
from trainer.checkpoint import MANIFEST, TRAINER_STATE, CheckpointError, verify  # noqa: E402
from trainer.state import TrainState  # noqa: E402

WARMUP_COSINE = {
    "_target_": "trainer.callbacks.lr_schedule.WarmupCosine",
    "warmup_steps": 3,
    "min_ratio": 0.1,
}
# Shuffle on, dropout on (the RNG matters), AdamW (optimizer state matters), a schedule (the
# step-dependent rate matters): 8 steps per epoch, 3 epochs.
RESUMABLE = {
    "optim": ADAMW,
    "schedule": WARMUP_COSINE,
    "model": {"dropout": 0.3},
    "max_epochs": 3,
    "log_every_steps": 1,
}


def _folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CrashAt(Callback):
    """Raises at the start of step `at` (a simulated crash); `at=None` never raises."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.at:
            raise RuntimeError(f"simulated crash before step {self.at}")


class FirstStep(Callback):
    def __init__(self) -> None:
        self.first: int | None = None

    def on_step_start(self, state: TrainState) -> None:
        if self.first is None:
            self.first = state.step


def _save_at(run_dir: Path, steps: int, every: int, keep_last: int = 10, **kw) -> Path:
    trainer = make_trainer(
        run_dir, max_steps=steps, checkpoint={"every_steps": every, "keep_last": keep_last}, **kw
    )
    trainer.fit()
    return run_dir / "checkpoints"


# ------------------------------------------------------------------------------- layout


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_save_layout_and_manifest(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, checkpoint={"save_final": True})
    trainer.fit()

    assert _folders(tmp_path) == ["step_00000003"]
    folder = tmp_path / "checkpoints" / "step_00000003"
    names = sorted(p.name for p in folder.iterdir())
    assert MANIFEST in names and TRAINER_STATE in names and "rng_rank0.pt" in names
    assert ".metadata" in names and any(n.endswith(".distcp") for n in names)
    assert not any(n.endswith((".tmp", ".partial")) for n in names)

    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["step"] == 3
    assert manifest["world_size"] == 1
    assert sorted(manifest["files"]) == sorted(n for n in names if n != MANIFEST)
    for name, digest in manifest["files"].items():
        assert digest == _sha256(folder / name), name
    assert verify(folder) == manifest

    # The saved weights are the model's weights at the save.
    saved = {k: torch.zeros_like(v) for k, v in trainer.model.state_dict().items()}
    dcp.load({"model": saved}, checkpoint_id=folder)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(saved[name], value), name


def test_checkpoint_files_load_weights_only(tmp_path):
    class Counter(Callback):
        def state_dict(self):
            return {"n": 7, "history": torch.arange(3)}

    trainer = make_trainer(
        tmp_path, max_steps=4, checkpoint={"save_final": True}, callbacks=[Counter()]
    )
    trainer.fit()
    folder = tmp_path / "checkpoints" / "step_00000004"

    saved = torch.load(folder / TRAINER_STATE, weights_only=True)
    assert saved["state"]["step"] == 4
    assert saved["state"]["batches_in_epoch"] == 4
    assert saved["state"]["samples_seen"] == 4 * 32
    assert saved["callbacks"]["0:Counter"]["n"] == 7
    assert torch.equal(saved["callbacks"]["0:Counter"]["history"], torch.arange(3))

    rng = torch.load(folder / "rng_rank0.pt", weights_only=True)
    assert torch.equal(rng["torch"], torch.get_rng_state())  # nothing drew since the save
    assert {"torch", "cuda", "numpy", "python"} <= rng.keys()


# ------------------------------------------------------------------------------- verify


def _flip_byte_in_distcp(folder: Path) -> Path:
    path = next(folder.glob("*.distcp"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _truncate_trainer_state(folder: Path) -> Path:
    path = folder / TRAINER_STATE
    path.write_bytes(path.read_bytes()[:-10])
    return path


def _delete_manifest(folder: Path) -> Path:
    path = folder / MANIFEST
    path.unlink()
    return path


def _empty_folder(folder: Path) -> Path:
    shutil.rmtree(folder)
    folder.mkdir()
    return folder / MANIFEST


def _delete_rng(folder: Path) -> Path:
    path = folder / "rng_rank0.pt"
    path.unlink()
    return path


DAMAGE = [
    pytest.param(_flip_byte_in_distcp, id="flipped_byte_distcp"),
    pytest.param(_truncate_trainer_state, id="truncated_trainer_state"),
    pytest.param(_delete_manifest, id="no_manifest"),
    pytest.param(_empty_folder, id="empty_folder"),
    pytest.param(_delete_rng, id="missing_listed_file"),
]


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_the_damaged_file(tmp_path, damage):
    root = _save_at(tmp_path, steps=2, every=2)
    folder = root / "step_00000002"
    verify(folder)
    culprit = damage(folder)

    with pytest.raises(CheckpointError, match=re.escape(str(culprit))):
        verify(folder)
    # Resuming from that folder by name refuses it too, before touching the model.
    trainer = make_trainer(tmp_path, max_steps=4, resume=str(folder))
    before = clone_model(trainer)
    with pytest.raises(CheckpointError, match=re.escape(str(culprit))):
        trainer.fit()
    for name, value in before.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value)


def test_verify_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope"))):
        verify(tmp_path / "nope")


def test_newest_valid_skips_damaged_newest(tmp_path):
    root = _save_at(tmp_path, steps=4, every=2)
    assert _folders(tmp_path) == ["step_00000002", "step_00000004"]
    _flip_byte_in_distcp(root / "step_00000004")

    trainer = make_trainer(tmp_path, max_steps=4, resume="auto")
    with pytest.warns(RuntimeWarning, match="step_00000004"):
        assert trainer.checkpointer.newest_valid() == root / "step_00000002"

    first = FirstStep()
    trainer.callbacks.append(first)
    with pytest.warns(RuntimeWarning, match="step_00000004"):
        trainer.fit()
    assert first.first == 2  # resumed from the valid step 2
    assert trainer.state.step == 4


def test_newest_valid_none_when_nothing_saved(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, resume="auto")
    assert trainer.checkpointer.newest_valid() is None
    first = FirstStep()
    trainer.callbacks.append(first)
    trainer.fit()  # a fresh start
    assert first.first == 0


def test_every_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, Path.rename

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_rename(self: Path, target: Any) -> Path:
        events.append(("rename", f"{self} -> {target}"))
        return rename(self, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "rename", recording_rename)
    folder = _save_at(tmp_path, steps=2, every=2) / "step_00000002"
    partial = f"{folder}.partial"
    (commit,) = [i for i, e in enumerate(events) if e == ("rename", f"{partial} -> {folder}")]
    synced_before = {path for kind, path in events[:commit] if kind == "fsync"}
    for name in sorted(p.name for p in folder.iterdir()):  # synced as itself, or as the
        # temporary file it was renamed from (DCP's .metadata, our own files)
        assert {f"{partial}/{name}", f"{partial}/{name}.tmp"} & synced_before, name
    assert partial in synced_before  # the folder's entries
    assert ("fsync", str(folder.parent)) in events[commit:]  # the rename itself


@pytest.mark.parametrize("keep_last", [2, 3])
def test_keep_last(tmp_path, keep_last):
    _save_at(tmp_path, steps=5, every=1, keep_last=keep_last)
    assert _folders(tmp_path) == [f"step_{s:08d}" for s in range(6 - keep_last, 6)]


class ScriptedMetric(Callback):
    """Logs `score` = values[step - 1] at every step, as a validation metric would be."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_step_end(self, state: TrainState) -> None:
        state.log({"score": self.values[state.step - 1]})


@pytest.mark.parametrize(("mode", "best_step"), [("max", 2), ("min", 4)], ids=["max", "min"])
def test_the_best_checkpoint_is_kept_beside_the_last_ones(tmp_path, mode, best_step):
    scores = [0.5, 0.9, 0.7, 0.1, 0.6, 0.8, 0.4]  # best: step 2 (max), step 4 (min)
    checkpoint = {"every_steps": 1, "keep_last": 2, "best_monitor": "score", "best_mode": mode}
    trainer = make_trainer(
        tmp_path, max_steps=7, checkpoint=checkpoint, callbacks=[ScriptedMetric(scores)]
    )
    trainer.fit()
    assert _folders(tmp_path) == sorted(f"step_{s:08d}" for s in {best_step, 6, 7})
    assert trainer.checkpointer.best() == tmp_path / "checkpoints" / f"step_{best_step:08d}"
    manifest = verify(trainer.checkpointer.best())
    assert manifest["monitor"] == {"score": scores[best_step - 1]}


def test_a_mid_epoch_checkpoint_carries_no_score_of_other_weights(tmp_path):
    # 8 steps an epoch, validation at each epoch's end: steps 4 and 12 fall inside an epoch, so
    # the latest val/loss scored earlier weights; 8 and 16 are saved after their validation.
    checkpoint = {"every_steps": 4, "keep_last": 10, "best_monitor": "val/loss", "best_mode": "min"}
    trainer = make_trainer(tmp_path, max_epochs=2, checkpoint=checkpoint)
    val_losses = []
    trainer.callbacks.append(EvalLosses(val_losses))
    trainer.fit()
    monitors = {
        int(p.name.removeprefix("step_")): verify(p)["monitor"]
        for p in sorted((tmp_path / "checkpoints").glob("step_*"))
    }
    assert monitors == {
        4: {},
        8: {"val/loss": val_losses[0]},
        12: {},
        16: {"val/loss": val_losses[1]},
    }


class EvalLosses(Callback):
    def __init__(self, into: list[float]) -> None:
        self.into = into

    def on_eval_end(self, state: TrainState) -> None:
        self.into.append(state.metrics["val/loss"])


def test_partial_folder_never_chosen(tmp_path):
    root = _save_at(tmp_path, steps=2, every=2)
    # A complete-looking save that was never committed (crash before the rename), newer.
    shutil.copytree(root / "step_00000002", root / "step_00000006.partial")
    verify(root / "step_00000006.partial")

    trainer = make_trainer(tmp_path, max_steps=4, resume="auto")
    assert trainer.checkpointer.newest_valid() == root / "step_00000002"
    first = FirstStep()
    trainer.callbacks.append(first)
    trainer.fit()
    assert first.first == 2


def test_save_replaces_stale_partial_of_same_step(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000002.partial").mkdir(parents=True)
    (root / "step_00000002.partial" / "junk.bin").write_bytes(b"left over")
    _save_at(tmp_path, steps=2, every=2)
    assert _folders(tmp_path) == ["step_00000002"]
    manifest = verify(root / "step_00000002")
    assert "junk.bin" not in manifest["files"]
    assert not (root / "step_00000002" / "junk.bin").exists()


# ------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("every", "resume_mode", "saved_at", "workers", "dropout_schedule", "async_save"),
    [
        (5, "auto", (1, 2), 0, False, False),  # saves at 5 and 10: resume from 10, epoch 1, 2 in
        (5, "path", (1, 2), 0, False, False),
        (8, "auto", (1, 0), 0, False, False),  # saves at 8, after epoch 0 ends: epoch 1, 0 in
        # Two loader worker processes and a dropout schedule on top of shuffling and LR decay.
        (5, "auto", (1, 2), 2, True, False),
        # Saves written in the background: one is committed at the next save, so the crash
        # leaves step 10 uncommitted (a .partial folder) and resume falls back to step 5.
        (5, "auto", (0, 5), 0, False, True),
    ],
    ids=["mid_epoch_auto", "mid_epoch_path", "epoch_end_auto", "workers_dropout_schedule", "async"],
)
def test_resume_is_bit_identical(
    tmp_path, every, resume_mode, saved_at, workers, dropout_schedule, async_save
):
    extra = dict(RESUMABLE, data={"num_workers": workers})

    def callbacks(*more: Callback) -> list[Callback]:
        linear = DropoutSchedule(schedule="linear", start_value=0.3, end_value=0.05)
        return [linear, *more] if dropout_schedule else list(more)

    # Uninterrupted: 24 steps, nothing saved.
    straight_losses = StepLosses()
    straight = make_trainer(tmp_path / "straight", callbacks=callbacks(straight_losses), **extra)
    straight.fit()
    assert len(straight_losses.losses) == 24

    # Interrupted: saves every `every` steps, crashes before step 12, then a fresh trainer
    # resumes from the newest checkpoint.
    run_dir = tmp_path / "interrupted"
    ckpt = {"every_steps": every, "async_save": async_save}
    crashed_losses = StepLosses()
    crashed = make_trainer(
        run_dir,
        checkpoint=ckpt,
        callbacks=callbacks(crashed_losses, CrashAt(12)),
        **extra,
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    newest = (11 // every - async_save) * every
    complete = [name for name in _folders(run_dir) if not name.endswith(".partial")]
    assert complete[-1] == f"step_{newest:08d}"
    assert ("step_00000010.partial" in _folders(run_dir)) == async_save
    folder = run_dir / "checkpoints" / f"step_{newest:08d}"
    saved = torch.load(folder / TRAINER_STATE, weights_only=True)["state"]
    assert (saved["epoch"], saved["batches_in_epoch"]) == saved_at

    resumed_losses = StepLosses()
    first = FirstStep()
    resumed = make_trainer(
        run_dir,
        checkpoint=ckpt,
        resume="auto" if resume_mode == "auto" else str(folder),
        callbacks=callbacks(resumed_losses, CrashAt(None), first),
        **extra,
    )
    assert not torch.equal(  # a fresh build starts from the initial weights, not the saved ones
        next(resumed.model.parameters()), next(crashed.model.parameters())
    )
    state = resumed.fit()

    assert first.first == newest
    assert state.step == 24 and state.epoch == 3
    assert crashed_losses.losses == straight_losses.losses[:12]
    assert resumed_losses.losses == straight_losses.losses[newest:]
    straight_sd, resumed_sd = straight.model.state_dict(), resumed.model.state_dict()
    for name, value in straight_sd.items():
        assert torch.equal(resumed_sd[name], value), name
    for key, value in straight.optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(resumed.optimizer.state_dict()["state"][key][name], tensor)
    assert state.samples_seen == straight.state.samples_seen
    assert state.metrics["val/loss"] == straight.state.metrics["val/loss"]


def test_resume_keeps_learning_rate_schedule(tmp_path):
    """After a resume each step runs at the rate the uninterrupted run used at that step."""

    class Rates(Callback):
        def __init__(self) -> None:
            self.by_step: dict[int, float] = {}

        def on_step_start(self, state: TrainState) -> None:
            self.by_step[state.step] = state.optimizer.param_groups[0]["lr"]

    straight = Rates()
    make_trainer(tmp_path / "straight", callbacks=[straight], **RESUMABLE).fit()

    run_dir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(
            run_dir, checkpoint={"every_steps": 10}, callbacks=[CrashAt(12)], **RESUMABLE
        ).fit()
    resumed = Rates()
    make_trainer(
        run_dir, checkpoint={"every_steps": 10}, resume="auto", callbacks=[resumed], **RESUMABLE
    ).fit()

    assert sorted(resumed.by_step) == list(range(10, 24))
    assert resumed.by_step == {s: straight.by_step[s] for s in range(10, 24)}


def test_callback_state_round_trips(tmp_path):
    class Counter(Callback):
        def __init__(self) -> None:
            self.steps = 0
            self.values = torch.zeros(3)
            self.at_fit_start: int | None = None

        def on_fit_start(self, state: TrainState) -> None:
            self.at_fit_start = self.steps

        def on_step_end(self, state: TrainState) -> None:
            self.steps += 1
            self.values += state.step

        def state_dict(self):
            return {"steps": self.steps, "values": self.values.clone(), "tag": "counter"}

        def load_state_dict(self, state):
            assert state["tag"] == "counter"
            self.steps = state["steps"]
            self.values = state["values"].clone()

    straight = Counter()
    make_trainer(tmp_path / "straight", max_steps=10, callbacks=[straight]).fit()

    run_dir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(
            run_dir,
            max_steps=10,
            checkpoint={"every_steps": 6},
            callbacks=[Counter(), CrashAt(8)],
        ).fit()

    resumed = Counter()
    make_trainer(
        run_dir,
        max_steps=10,
        checkpoint={"every_steps": 6},
        resume="auto",
        callbacks=[resumed, CrashAt(None)],
    ).fit()
    assert resumed.at_fit_start == 6  # loaded before on_fit_start
    assert resumed.steps == straight.steps == 10
    assert torch.equal(resumed.values, straight.values)


@pytest.mark.parametrize("resume_mode", ["auto", "path"])
def test_resume_into_other_shape_names_folder(tmp_path, resume_mode):
    root = _save_at(tmp_path, steps=2, every=2)
    folder = root / "step_00000002"
    resume = "auto" if resume_mode == "auto" else str(folder)
    trainer = make_trainer(tmp_path, max_steps=4, model={"hidden": [24]}, resume=resume)
    with pytest.raises(CheckpointError, match=re.escape(str(folder))):
        trainer.fit()
    assert trainer.state.step == 0
