"""Checkpoints: one folder per step, committed atomically, verified by checksums before use.

Layout of `<run dir>/checkpoints/step_00000120/`::

    .metadata, __*_*.distcp   model and optimizer through torch.distributed.checkpoint (DCP):
                              sharded per rank, reloadable on another world size
    trainer_state.pt          loop counters, every callback's state, the grad scaler (rank 0)
    rng_rank{r}.pt            each rank's torch / CUDA / numpy / random generator states
    manifest.json             sha256 of every file above; written last

A save goes to `step_N.partial/`; rank 0 writes the manifest once every rank has finished, then
renames the folder to `step_N`, so a folder without `.partial` is complete by construction and a
crash mid-save leaves the previous checkpoint untouched. The folder is the temporary: every file
in it is fsynced (DCP's shards by DCP, ours by `_write_atomic`, which also writes through a
temporary name), then the folder itself, then the rename is fsynced in its parent. The loaders'
generators need no saving: they are reseeded from (seed, epoch), and the data position is the
epoch and the batches consumed in it. Old checkpoints are deleted only after
the new one is committed. Everything is loaded with `weights_only=True`: DCP's own `.metadata` is a
pickle, so load checkpoints only from folders you trust (your run folder, or a path you name).
"""

from __future__ import annotations

import contextlib
import hashlib
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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.config import CheckpointConfig
from trainer.data.loaders import batch_size_of
from trainer.distributed.env import all_reduce_max, barrier, dist_rank

if TYPE_CHECKING:
    from trainer.loop import Trainer

# DCP warns, on every save and load, that a world of one saves and loads in one process.
warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, damaged or does not fit the model."""


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, resume: str | None):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.resume = resume
        self.last_saved_step = -1  # the newest step saved (perhaps still being written)
        self.last_committed_step = -1  # the newest step whose checkpoint is complete on disk
        self.pending: tuple | None = None  # a save to commit: (future, partial, final, step, world)

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
        barrier()
        with self._reporting_failure(partial):
            model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
            write = dcp.async_save if self.cfg.async_save else dcp.save
            written = write({"model": model_sd, "optim": optim_sd}, checkpoint_id=partial)
            _save_atomic(_rng_state(), partial / f"rng_rank{rank}.pt")
            if rank == 0:
                _save_atomic(_trainer_state(trainer), partial / TRAINER_STATE)
        # The monitored value as it stands at this step (the latest validation's, say).
        best_value = state.metrics.get(self.cfg.best_monitor) if self.cfg.best_monitor else None
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
        barrier()
        if dist_rank() == 0:
            with self._reporting_failure(partial):
                manifest = {
                    "step": step,
                    "world_size": world_size,
                    "monitor": {self.cfg.best_monitor: best_value}
                    if best_value is not None
                    else {},
                    "files": {p.name: _sha256(p) for p in sorted(partial.iterdir()) if p.is_file()},
                }
                _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
                _fsync_dir(partial)  # the folder's entries are on disk before it is renamed
                if final.exists():
                    shutil.rmtree(final)
                partial.rename(final)
                _fsync_dir(self.root)
            self._delete_old()
        barrier()
        self.last_committed_step = step

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
                f"{partial}: saving the checkpoint failed ({err}); is the disk full? {kept}"
            ) from err

    def _delete_old(self) -> None:
        # Oldest first by commit time (the manifest's), not by step: after a resume from an
        # older checkpoint, stale higher steps go before the checkpoint just written.
        complete = sorted(
            (p for p in self.root.glob("step_*") if (p / MANIFEST).is_file()),
            key=lambda p: (p / MANIFEST).stat().st_mtime_ns,
        )
        best = self.best()
        for old in complete[: -self.cfg.keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)

    def best(self) -> Path | None:
        """The complete checkpoint with the best `best_monitor` value (the newest of equals), or
        None when no best is kept or none has the value."""
        key, scored = self.cfg.best_monitor, []
        for folder in sorted(self.root.glob("step_*")):
            try:
                value = json.loads((folder / MANIFEST).read_text()).get("monitor", {}).get(key)
            except (OSError, ValueError):
                continue  # incomplete or damaged: never the best
            if value is not None and math.isfinite(value):
                scored.append((value if self.cfg.best_mode == "max" else -value, folder))
        return max(scored)[1] if scored else None

    # ------------------------------------------------------------------ resume
    def maybe_resume(self, trainer: Trainer) -> None:
        if not self.resume:
            return
        if self.resume == "auto":
            folder = self.newest_valid()
            # Every rank must resume from the same step: take the oldest of the ranks' choices
            # (they differ only if a rank could not read a newer checkpoint).
            step = -all_reduce_max(-(_step_of(folder) if folder else -1), trainer.env.device)
            if step < 0:
                return  # nothing saved yet: a fresh start
            folder = self.root / f"step_{step:08d}"
        else:
            folder = Path(self.resume)
        verify(folder)
        load(folder, trainer)
        self.last_saved_step = self.last_committed_step = trainer.state.step

    def newest_valid(self) -> Path | None:
        for folder in sorted(self.root.glob("step_*"), reverse=True):
            if folder.name.endswith(".partial"):
                continue
            try:
                verify(folder)
                return folder
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint: {err}", RuntimeWarning, stacklevel=2)
        return None


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def verify(folder: Path) -> dict[str, Any]:
    """Check the manifest and every file's checksum; raise CheckpointError naming what is wrong."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted)")
    return manifest


def load(folder: Path, trainer: Trainer) -> None:
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    try:
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
        set_state_dict(
            trainer.model, trainer.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd
        )
    except (Exception, dcp.api.CheckpointException) as err:  # DCP's is a BaseException
        raise CheckpointError(f"{folder}: does not fit this model/optimizer ({err})") from None
    saved = torch.load(folder / TRAINER_STATE, weights_only=True)
    _check_data_position(folder, saved, trainer)
    trainer.state.load_state_dict(saved["state"])
    trainer.scaler.load_state_dict(saved["scaler"])
    for key, callback in _keyed(trainer.callbacks).items():
        if key in saved["callbacks"]:
            callback.load_state_dict(saved["callbacks"][key])
    rng_file = folder / f"rng_rank{trainer.env.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: keep fresh seeds
        _set_rng_state(torch.load(rng_file, weights_only=True))


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
