"""Data loaders whose order is a pure function of (seed, epoch, rank), so runs resume exactly.

Training uses `DistributedSampler` in every world size, a world of one included: the global batch
of step t holds the same samples whether one process or N processes draw it (rank r takes every
N-th index of the epoch's permutation), which is what makes 1-vs-N parity tests possible. Data is
sharded over data-parallel ranks: the ranks of one tensor-parallel group read the same batch.
Evaluation shards the split without padding, so reduced metrics count every sample exactly once.
A training set held as a `TensorDataset` is fetched a whole batch at a time (`data.batched_fetch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
    TensorDataset,
)

from trainer.config import DataConfig
from trainer.distributed.env import DistEnv


class ResumableSampler(DistributedSampler):
    """A `DistributedSampler` that can begin an epoch part-way through (for mid-epoch resume)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def train_loader(dataset: Dataset, cfg: DataConfig, env: DistEnv, seed: int) -> DataLoader:
    sampler = ResumableSampler(
        dataset,
        num_replicas=env.dp_size,
        rank=env.dp_rank,
        shuffle=cfg.shuffle,
        seed=seed,
        drop_last=True,  # never pad the training set with duplicates
    )
    # Exactly a TensorDataset: a subclass may do per-sample work in __getitem__.
    if cfg.batched_fetch and type(dataset) is TensorDataset:
        # PyTorch's "loading batched data" pattern: the sampler hands the loader whole batches of
        # indices, which index each tensor once. Building a batch of 256 samples one
        # __getitem__ at a time and stacking them takes ~2 ms on one CPU core (a fifth of the
        # MLP benchmark's step); this takes a few dozen microseconds.
        batches = BatchSampler(sampler, cfg.batch_size, drop_last=cfg.drop_last)
        return _loader(dataset, None, cfg, env, sampler=batches, drop_last=False)
    return _loader(dataset, cfg.batch_size, cfg, env, sampler=sampler, drop_last=cfg.drop_last)


def batch_size_of(loader: DataLoader) -> int:
    """A training loader's batch size, whether the loader or its batch sampler batches."""
    return loader.batch_size or getattr(loader.batch_sampler or loader.sampler, "batch_size", 0)


def _resumable_sampler(loader: DataLoader) -> ResumableSampler:
    sampler = loader.sampler
    return sampler.sampler if isinstance(sampler, BatchSampler) else sampler


def eval_loader(dataset: Dataset, cfg: DataConfig, env: DistEnv) -> DataLoader:
    # Rank r evaluates samples r, r+N, r+2N, ...: no padding, so every sample counts once.
    shard = Subset(dataset, range(env.dp_rank, len(dataset), env.dp_size))
    return _loader(shard, cfg.eval_batch_size, cfg, env, sampler=None, drop_last=False)


def _loader(
    dataset: Dataset,
    batch_size: int | None,
    cfg: DataConfig,
    env: DistEnv,
    sampler: DistributedSampler | BatchSampler | None,
    drop_last: bool,
) -> DataLoader:
    # Each loader owns its generator: creating an iterator draws worker seeds from it, never from
    # the global RNG, so evaluation cannot shift the training stream.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=env.device.type == "cuda",
        generator=torch.Generator(),
    )


def start_epoch(loader: DataLoader, epoch: int, seed: int, skip_batches: int = 0) -> None:
    """Position a training loader at `epoch`, `skip_batches` batches in. The loop calls this."""
    _resumable_sampler(loader).start_epoch(epoch, skip=skip_batches * batch_size_of(loader))
    loader.generator.manual_seed(seed * 100_003 + epoch)
