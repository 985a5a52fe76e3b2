"""Checkpoints: one folder per step, committed atomically, verified before use.

Layout of `<run dir>/checkpoints/step_00000120/`::

    .metadata, __*_*.distcp   model and optimizer through torch.distributed.checkpoint (DCP):
                              sharded per rank, reloadable on another world size
    trainer_state.pt          loop counters, every callback's state, the grad scaler (rank 0)
    rng_rank{r}.pt            each rank's torch / CUDA / numpy / random generator states
    manifest.json             the world size, and the sha256 of every file above; written last

A save goes to `step_N.partial/`; rank 0 writes the manifest once every rank has finished, then
renames the folder to `step_N`, so a folder named `step_N` is complete by construction and a
crash mid-save leaves the previous checkpoint untouched. Every file is fsynced (DCP's shards by
DCP, ours by `_write_atomic`), then the folder, then the rename in its parent. Old checkpoints go
only after the new one is committed, renamed to `step_N.deleting` first, so that a crash midway
never leaves a partial folder under a final name; leftovers are removed at the next commit. DCP
writes through a gloo process group of its own, so that a background save (`async_save`) never
mixes its collectives with the training's. The loaders' generators need no saving: they are
reseeded from (seed, epoch), and the data position is the epoch and the batches consumed in it.

A resume first runs `verify` (trainer/checkpoint_reader.py): the manifest must list every file
its world size implies, with matching checksums. Nothing is unpickled except through an
allowlist (DCP's `.metadata` by a restricted unpickler, everything else by
`torch.load(weights_only=True)`), and no file the manifest does not list is read. `resume=auto`
takes the newest checkpoint that verifies on every rank, skipping damaged ones with a warning,
and stops with a CheckpointError when checkpoints exist but none is usable, leaving them as
they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from trainer.checkpoint_reader import (
    COMMITTED,
    MANIFEST,
    TRAINER_STATE,
    CheckpointError,
    ListedFilesReader,
    WeightsOnlyLoadPlanner,
    check_complete,
    committed,
    refuse_run_folder,
    rng_file,
    sha256,
    verify,
)
from trainer.config import CheckpointConfig
from trainer.data.loaders import batch_size_of
from trainer.distributed.env import all_reduce_max, any_rank, dist_rank, several_ranks

if TYPE_CHECKING:
    from trainer.loop import Trainer

# DCP warns, on every save and load, that a world of one saves and loads in one process.
warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)

NOTHING_SAVED, NONE_USABLE = -1, -2  # what a rank found instead of a step, for the agreement


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, resume: str | None):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.resume = resume
        self.last_saved_step = -1  # the newest step saved (perhaps still being written)
        self.last_committed_step = -1  # the newest step whose checkpoint is complete on disk
        self.pending: tuple | None = None  # a save to commit: (future, partial, final, step, ...)
        self.verified: dict[Path, dict[str, Any]] = {}  # manifests checked by newest_valid
        # Checkpointing's own process group (torchtitan's way): a background save runs DCP's
        # collectives in its thread while the training thread runs DDP's or FSDP's on the
        # training group, and two threads must never share one group's sequence of collectives.
        # Every rank builds its Checkpointer at the same point, as new_group requires.
        self.group = dist.new_group(backend="gloo") if several_ranks() else None

    # ------------------------------------------------------------------ when to save
    def due(self, step: int) -> bool:
        """Whether `maybe_save` saves at this step."""
        every = self.cfg.every_steps
        return bool(every) and step % every == 0

    def maybe_save(self, trainer: Trainer) -> None:
        if self.due(trainer.state.step):
            self.save(trainer)

    def save_final(self, trainer: Trainer, force: bool = False) -> None:
        """At the end of fit (`force`: a stop that must leave a checkpoint, e.g. preemption).
        Also completes a save still running in the background."""
        if (self.cfg.save_final or force) and self.last_saved_step != trainer.state.step:
            self.save(trainer)
        self.finish_pending()

    # ------------------------------------------------------------------ save
    def save(self, trainer: Trainer) -> Path:
        """Write a checkpoint of this step. Every rank calls it at the same step.

        With `async_save`, model and optimizer are copied to CPU memory here and written by a
        background thread while training goes on; the checkpoint is committed (manifest, rename)
        at the next save or at the end of fit.
        """
        self.finish_pending()
        state, rank = trainer.state, trainer.env.rank
        final = self.root / f"step_{state.step:08d}"
        partial = final.with_name(final.name + ".partial")
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save
            partial.mkdir(parents=True)
        self._barrier()
        with self._reporting_failure(partial):
            model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
            write = dcp.async_save if self.cfg.async_save else dcp.save
            written = write(
                {"model": model_sd, "optim": optim_sd},
                checkpoint_id=str(partial),
                process_group=self.group,
            )
            _save_atomic(_rng_state(), partial / rng_file(rank))
            if rank == 0:
                _save_atomic(_trainer_state(trainer), partial / TRAINER_STATE)
        # The score of these very weights: a value logged at this step (mid-epoch, the last
        # validation scored other weights: no score).
        best_value = state.current(self.cfg.best_monitor) if self.cfg.best_monitor else None
        self.pending = (written, partial, final, state.step, trainer.env.world_size, best_value)
        if not self.cfg.async_save:
            self.finish_pending()
        self.last_saved_step = state.step
        return final

    def finish_pending(self) -> None:
        """Wait for a background write, then commit: manifest last, then the atomic rename."""
        if self.pending is None:
            return
        written, partial, final, step, world_size, best_value = self.pending
        self.pending = None
        with self._reporting_failure(partial):
            if self.cfg.async_save:
                written.result()
        self._barrier()
        if dist_rank() == 0:
            with self._reporting_failure(partial):
                files = {p.name: sha256(p) for p in sorted(partial.iterdir()) if p.is_file()}
                # Never commit a checkpoint that lacks a file a resume needs
                check_complete(partial, set(files), world_size)
                monitor = {self.cfg.best_monitor: best_value} if best_value is not None else {}
                manifest = {"step": step, "world_size": world_size, "monitor": monitor}
                manifest["files"] = files
                _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
                _fsync_dir(partial)  # the folder's entries are on disk before it is renamed
                if final.exists():  # a stale checkpoint of this step, from before a resume
                    _discard(final)
                partial.rename(final)
                _fsync_dir(self.root)
            self._delete_old()
        self._barrier()
        self.last_committed_step = step

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    @contextlib.contextmanager
    def _reporting_failure(self, partial: Path) -> Iterator[None]:
        try:
            yield
        # torch reports a full disk as a RuntimeError, and DCP wraps write errors in its own
        # CheckpointException (a BaseException).
        except (OSError, RuntimeError, dcp.api.CheckpointException) as err:
            shutil.rmtree(partial, ignore_errors=True)
            previous = self.last_committed_step
            kept = f"step {previous} is intact" if previous >= 0 else "no earlier checkpoint exists"
            raise CheckpointError(
                f"{partial}: saving the checkpoint failed ({_cause(err)}); is the disk full? {kept}"
            ) from err

    def _delete_old(self) -> None:
        # Leftovers of crashed saves and deletions; no save is in flight while this runs.
        for leftover in self.root.glob("step_*"):
            if not COMMITTED.fullmatch(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
        # Oldest first by commit time (the manifest's), not by step: after a resume from an
        # older checkpoint, stale higher steps go before the checkpoint just written.
        complete = sorted(
            (p for p in committed(self.root) if (p / MANIFEST).is_file()),
            key=lambda p: (p / MANIFEST).stat().st_mtime_ns,
        )
        best = self.best()
        for old in complete[: -self.cfg.keep_last]:
            if old != best:
                _discard(old)

    def best(self) -> Path | None:
        """The complete checkpoint with the best `best_monitor` value (the newest of equals), or
        None when no best is kept or none has the value."""
        key, scored = self.cfg.best_monitor, []
        for folder in committed(self.root):
            try:
                value = json.loads((folder / MANIFEST).read_text()).get("monitor", {}).get(key)
            except (OSError, ValueError):
                continue  # incomplete or damaged: never the best
            if value is not None and math.isfinite(value):
                scored.append((value if self.cfg.best_mode == "max" else -value, folder))
        return max(scored)[1] if scored else None

    # ------------------------------------------------------------------ resume
    def maybe_resume(self, trainer: Trainer) -> Path | None:
        """Load the checkpoint `resume` names; returns its folder, or None when none was loaded."""
        if not self.resume:
            return None
        device = trainer.env.device
        if self.resume == "auto":
            folder = self._agreed_newest(device)
            if folder is None:
                return None  # nothing saved yet: a fresh start
        else:
            folder = Path(self.resume)
            refuse_run_folder(folder)
        # Every rank checks the folder; a failure on any stops all before DCP's collectives.
        try:
            manifest, error = self.verified.get(folder) or verify(folder), None
        except CheckpointError as err:
            manifest, error = {}, err
        if any_rank([error is not None], device)[0]:
            raise error or CheckpointError(f"{folder}: another rank could not verify it")
        load(folder, trainer, set(manifest["files"]))
        self.last_saved_step = self.last_committed_step = trainer.state.step
        return folder

    def newest_valid(self) -> Path | None:
        """The newest checkpoint that verifies on this rank; each damaged newer one is skipped
        with a RuntimeWarning naming the file."""
        return self._scan()[0]

    def _scan(self) -> tuple[Path | None, list[str]]:
        skipped = []
        for folder in reversed(committed(self.root)):
            try:
                self.verified[folder] = verify(folder)
                return folder, skipped
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint: {err}", RuntimeWarning, stacklevel=3)
                skipped.append(str(err))
        return None, skipped

    def _agreed_newest(self, device: torch.device) -> Path | None:
        """The newest checkpoint every rank can use, None when no rank sees any checkpoint;
        a CheckpointError on every rank when checkpoints exist but one rank can use none (the
        user asked to resume: starting afresh would overwrite them)."""
        folder, skipped = self._scan()
        if folder is not None:
            found = int(folder.name.removeprefix("step_"))
        else:
            found = NONE_USABLE if skipped else NOTHING_SAVED
        # Every rank resumes from the same step: the oldest of the ranks' choices (they differ
        # only if a rank could not read a newer checkpoint).
        oldest, newest = -all_reduce_max(-found, device), all_reduce_max(found, device)
        if newest == NOTHING_SAVED:
            return None
        if oldest == NONE_USABLE:
            why = "; ".join(skipped) if skipped else "it is usable here but not on another rank"
            raise CheckpointError(
                f"{self.root}: resume=auto found no usable checkpoint ({why}); they are left as "
                "they are for inspection: resume from a checkpoint you repaired with "
                "resume=<folder>, or start afresh in another run folder"
            )
        if oldest == NOTHING_SAVED:
            raise CheckpointError(
                f"{self.root}: some ranks see checkpoints here and some none; is the run folder "
                "on a file system that every node shares?"
            )
        return self.root / f"step_{oldest:08d}"


def load_model_weights(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Verify the checkpoint `folder` and load only its model weights into `model` (evaluation,
    export: no optimizer, counters or generators); returns the manifest."""
    manifest = verify(folder)
    model_sd = get_model_state_dict(model)
    try:
        dcp.load(
            {"model": model_sd},
            storage_reader=ListedFilesReader(folder, set(manifest["files"])),
            planner=WeightsOnlyLoadPlanner(),
        )
        set_model_state_dict(model, model_sd)
    except (Exception, dcp.api.CheckpointException) as err:  # DCP's is a BaseException
        raise CheckpointError(f"{folder}: does not fit this model ({_cause(err)})") from None
    return manifest


def load(folder: Path, trainer: Trainer, listed: set[str]) -> None:
    """Load a verified checkpoint into `trainer`, reading only the files in `listed` (its
    manifest's names)."""
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    try:
        dcp.load(
            {"model": model_sd, "optim": optim_sd},
            storage_reader=ListedFilesReader(folder, listed),
            planner=WeightsOnlyLoadPlanner(),
        )
        set_state_dict(
            trainer.model, trainer.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd
        )
    except (Exception, dcp.api.CheckpointException) as err:  # DCP's is a BaseException
        raise CheckpointError(
            f"{folder}: does not fit this model/optimizer ({_cause(err)})"
        ) from None
    saved = torch.load(folder / TRAINER_STATE, weights_only=True)
    _check_data_position(folder, saved, trainer)
    trainer.state.load_state_dict(saved["state"])
    trainer.scaler.load_state_dict(saved["scaler"])
    for key, callback in _keyed(trainer.callbacks).items():
        if key in saved["callbacks"]:
            callback.load_state_dict(saved["callbacks"][key])
    rng = rng_file(trainer.env.rank)
    if rng in listed:  # absent when resuming on more ranks than saved: keep fresh seeds
        _set_rng_state(torch.load(folder / rng, weights_only=True))


# ---------------------------------------------------------------------- pieces


def _keyed(callbacks: list) -> dict[str, Any]:
    return {f"{i}:{type(cb).__name__}": cb for i, cb in enumerate(callbacks)}


def _global_batch(trainer: Trainer) -> int:
    return batch_size_of(trainer.train_loader) * trainer.env.dp_size


def _check_data_position(folder: Path, saved: dict[str, Any], trainer: Trainer) -> None:
    """Mid-epoch, the data position is a count of batches per rank: it points at the same
    samples on another world size only if the global batch (per-rank batch x data-parallel
    ranks) is unchanged. Refuse rather than replay or skip samples silently."""
    was, now = saved.get("global_batch"), _global_batch(trainer)
    if saved["state"]["batches_in_epoch"] and was is not None and was != now:
        raise CheckpointError(
            f"{folder}: saved in the middle of an epoch with a global batch of {was} samples "
            f"(data.batch_size x data-parallel ranks), but this run's is {now}; resume with a "
            f"data.batch_size that makes it {was} again, or from a checkpoint saved at an "
            "epoch's end"
        )


def _trainer_state(trainer: Trainer) -> dict[str, Any]:
    return {
        "global_batch": _global_batch(trainer),
        "state": trainer.state.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "callbacks": {k: cb.state_dict() for k, cb in _keyed(trainer.callbacks).items()},
    }


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state as tensors and plain values so that weights_only loading accepts it
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    kind, keys, pos, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = saved["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _cause(err: BaseException) -> str:
    """An error in one line: DCP's CheckpointException carries every rank's traceback."""
    if isinstance(err, dcp.api.CheckpointException):
        return "; ".join(f"rank {r}: {_cause(e)}" for r, (e, _) in err.failures.items())
    return " ".join(f"{type(err).__name__}: {err}".split())


def _discard(folder: Path) -> None:
    """Delete a committed checkpoint. Renamed away first (resume ignores the name), so that a
    crash midway leaves `step_N.deleting`, never a partial folder named `step_N`."""
    doomed = folder.with_name(folder.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    _fsync_dir(folder.parent)  # the rename reaches the disk before any of the deletions
    shutil.rmtree(doomed, ignore_errors=True)


def _save_atomic(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_atomic(path, buffer.getvalue())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
