"""Shuffling: one seeded permutation per epoch, shared by all ranks (each takes its own share),
different every epoch, switchable, and resumable mid-epoch at the exact next sample."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from trainer.config import DataConfig
from trainer.data.loaders import eval_loader, start_epoch, train_loader
from trainer.distributed.env import DistEnv

N, BATCH, SEED = 96, 8, 7


def dataset() -> TensorDataset:
    return TensorDataset(torch.arange(N), torch.zeros(N, dtype=torch.long))


def env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))


def epoch_order(
    rank: int, world: int, epoch: int, shuffle: bool = True, skip: int = 0
) -> list[int]:
    loader = train_loader(
        dataset(), DataConfig(batch_size=BATCH, shuffle=shuffle), env(rank, world), SEED
    )
    start_epoch(loader, epoch, SEED, skip_batches=skip)
    return [int(i) for inputs, _ in loader for i in inputs]


def test_ranks_share_one_permutation_and_split_it():
    for epoch in range(3):
        expected = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        rank0, rank1 = epoch_order(0, 2, epoch), epoch_order(1, 2, epoch)
        assert rank0 == expected[0::2] and rank1 == expected[1::2]
        assert sorted(rank0 + rank1) == list(range(N))  # disjoint, and together the whole set
        # Global batch k of two ranks holds the same samples as batch k of one process.
        single = epoch_order(0, 1, epoch)
        for k in range(N // (2 * BATCH)):
            pair = rank0[k * BATCH : (k + 1) * BATCH] + rank1[k * BATCH : (k + 1) * BATCH]
            assert sorted(pair) == sorted(single[2 * k * BATCH : 2 * (k + 1) * BATCH])


def test_every_epoch_is_a_different_order_and_repeatable():
    orders = [epoch_order(0, 1, epoch) for epoch in range(4)]
    assert len({tuple(o) for o in orders}) == 4
    assert epoch_order(0, 1, 2) == orders[2]


def test_shuffle_off_keeps_dataset_order():
    assert epoch_order(0, 1, 0, shuffle=False) == list(range(N))
    assert epoch_order(0, 1, 3, shuffle=False) == list(range(N))


def test_mid_epoch_resume_sees_exactly_the_remaining_samples():
    for rank in (0, 1):
        full = epoch_order(rank, 2, epoch=5)
        resumed = epoch_order(rank, 2, epoch=5, skip=3)
        assert resumed == full[3 * BATCH :]


def test_evaluation_is_never_shuffled_and_never_padded():
    data = TensorDataset(torch.arange(13), torch.zeros(13, dtype=torch.long))
    shards = [eval_loader(data, DataConfig(eval_batch_size=4), env(r, 2)) for r in (0, 1)]
    seen = [[int(i) for inputs, _ in shard for i in inputs] for shard in shards]
    assert seen == [list(range(0, 13, 2)), list(range(1, 13, 2))]


def batches(cfg: DataConfig, data, rank: int, world: int, epoch: int, skip: int = 0) -> list:
    loader = train_loader(data, cfg, env(rank, world), SEED)
    start_epoch(loader, epoch, SEED, skip_batches=skip)
    got = list(loader)
    assert len(got) == len(loader)  # what the loop counts steps by
    return got


def test_whole_batch_fetch_gives_the_per_sample_loaders_batches():
    # Inputs with a feature dimension and float values, targets of their own dtype; 100 samples
    # so that drop_last=False leaves a short last batch on each rank.
    data = TensorDataset(torch.randn(100, 3), torch.arange(100) % 10)
    for drop_last in (True, False):
        whole = DataConfig(batch_size=BATCH, drop_last=drop_last)
        per_sample = DataConfig(batch_size=BATCH, drop_last=drop_last, batched_fetch=False)
        for rank, world, epoch, skip in [(0, 1, 0, 0), (1, 2, 3, 0), (0, 2, 1, 2)]:
            got = batches(whole, data, rank, world, epoch, skip)
            want = batches(per_sample, data, rank, world, epoch, skip)
            assert len(got) == len(want)
            for (x, y), (x_ref, y_ref) in zip(got, want, strict=True):
                assert torch.equal(x, x_ref) and x.dtype == x_ref.dtype
                assert torch.equal(y, y_ref) and y.dtype == y_ref.dtype
            assert len(want[-1][0]) == (BATCH if drop_last else 100 // world % BATCH or BATCH)


def test_other_datasets_are_fetched_sample_by_sample():
    # A Subset cannot be indexed by a list of indices in every case: it keeps the per-sample path.
    data = torch.utils.data.Subset(dataset(), range(40))
    loader = train_loader(data, DataConfig(batch_size=BATCH), env(0, 1), SEED)
    assert loader.batch_size == BATCH
    assert sorted(int(i) for inputs, _ in loader for i in inputs) == list(range(40))
