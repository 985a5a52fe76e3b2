"""Stochastic depth under tensor parallelism (2 gloo ranks, CPU).

The ranks of a tensor-parallel group read the same batch and must drop the same samples: each
`DropPath` draws its per-sample mask from the generator every rank seeded alike, and multiplies
the full branch output after the rowwise projection. With drop-path active on every step (an
early-linear schedule from rate 0.3) the tensor-parallel run must end where one process ends; a
mask that differed between the ranks, or drew from the generator differently than one process,
would leave the weights far apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tests.helpers import ENV, make_config
from trainer.build import build_trainer
from trainer.callbacks.stochastic_depth import StochasticDepthSchedule
from trainer.config import ParallelConfig
from trainer.distributed.env import DistEnv, distributed
from trainer.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

MODEL = {
    "_target_": "trainer.models.TransformerClassifier",
    "dim": 16,
    "depth": 3,
    "heads": 2,
    "drop_path": 0.3,
}


def fit(strategy: str, env: DistEnv, run_dir: Path) -> dict[str, torch.Tensor]:
    cfg = make_config(
        model=MODEL,
        parallel=ParallelConfig(strategy=strategy, backend="gloo", timeout_s=60),
        max_steps=8,
    )
    trainer, _ = build_trainer(cfg, env, run_dir)
    schedule = {"schedule": "early", "early_mode": "linear", "start_value": 0.3, "until_step": 9}
    trainer.callbacks.append(StochasticDepthSchedule(**schedule))
    trainer.fit()
    weights = get_model_state_dict(
        trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return {name: tensor.clone() for name, tensor in weights.items()}


def _tp_worker(run_dir: str) -> dict[str, torch.Tensor]:
    with distributed("cpu", "gloo", 60) as env:
        return fit("tp", env, Path(run_dir))


def test_tensor_parallel_drop_path_matches_one_process(tmp_path):
    torch.set_num_threads(1)
    single = fit("none", ENV, tmp_path / "single")
    # Rank 0's full state dict holds rank 1's shards too (cpu_offload gathers to rank 0 only).
    tp = launch(_tp_worker, 2, str(tmp_path / "tp"))[0]
    assert tp.keys() == single.keys()
    for name, want in single.items():
        torch.testing.assert_close(tp[name], want, atol=2e-5, rtol=1e-4, msg=name)
