"""Train your own model on your own data from Python: `python examples/own_model.py` (a few
seconds on a CPU). The same script runs under torchrun: `torchrun --standalone
--nproc_per_node=2 examples/own_model.py parallel=ddp`. Arguments are hooktrain overrides."""

import sys

import torch
from mymodels import TinyNet
from torch.utils.data import TensorDataset

from trainer.api import fit


def blobs(n: int, seed: int) -> TensorDataset:
    """Two Gaussian blobs in 8 dimensions, labelled by the blob each point was drawn from."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen) + 2.0 * y[:, None]
    return TensorDataset(x, y)


if __name__ == "__main__":
    summary = fit(
        model=TinyNet(input_shape=(8,), num_classes=2, width=16),
        data=(blobs(512, 0), blobs(128, 1), blobs(128, 2)),
        overrides=["max_epochs=3", "optim.lr=1e-2", "logger=[jsonl]", *sys.argv[1:]],
    )
    # Every rank returns the same numbers (each metric is reduced over the ranks).
    print(
        f"test accuracy {summary['test/accuracy']:.3f}, test loss {summary['test/loss']:.4f}, "
        f"{summary['steps']} steps on {summary['world_size']} process(es), "
        f"run folder {summary['run_dir']}"
    )
