"""`LowRank` with a fine-tune epoch on 2-rank gloo runs (CPU): DDP with an MLP and FSDP2 with the
CNN (the rank held on DTensor shards), one process group.

Each rank returns its factorized model, the trainer's full weights and its report rows; the test
checks that both ranks hold the same (bit for bit), that the factorized model computes what the
rank-r dense model computes, that one process factorizing rank 0's weights with the same plan
builds the same model, and that the accuracy summed across ranks is the one-process accuracy of
that model on the whole test split.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.compression_runs import FAST_LATENCY, two_rank_config
from trainer.build import build_data, build_model, build_trainer
from trainer.compress.lowrank import apply_plan, fill_factors, svd
from trainer.config import TrainConfig
from trainer.distributed.env import DistEnv, distributed
from trainer.distributed.launch import launch
from trainer.pruning.shrink import full_state_dict, plain_copy

pytestmark = pytest.mark.distributed

WORLD = 2
CASES: dict[str, tuple[dict[str, Any], list[int]]] = {
    "ddp": ({"_target_": "trainer.models.MLP", "hidden": [32, 32]}, [8]),
    "fsdp": ({"_target_": "trainer.models.CNN", "channels": [4, 8], "hidden": 16}, [1, 16]),
}


def _config(strategy: str) -> TrainConfig:
    model, shape = CASES[strategy]
    low_rank = {
        "_target_": "trainer.callbacks.low_rank.LowRank",
        "energy": None,
        "ratio": 0.4,
        "finetune_epochs": 1,
        **FAST_LATENCY,
    }
    return two_rank_config(strategy, model, shape, {"low_rank": low_rank})


def _probe(strategy: str) -> torch.Tensor:
    return torch.randn(8, *CASES[strategy][1], generator=torch.Generator().manual_seed(1))


def _one_run(strategy: str, env: DistEnv, run_dir: Path) -> dict[str, Any]:
    trainer, _ = build_trainer(_config(strategy), env, run_dir)
    state = trainer.fit()
    (callback,) = trainer.callbacks
    dense = plain_copy(trainer.model).eval()  # a collective under FSDP2
    with torch.no_grad():
        outputs = callback.factorized(_probe(strategy))
        dense_outputs = dense(_probe(strategy))
    return {
        "wrapper": type(trainer.model).__name__,
        "plan": callback.plan,
        "factorized": callback.factorized.state_dict(),
        "outputs": outputs,
        "dense_outputs": dense_outputs,
        "weights": full_state_dict(trainer.model),  # a collective under FSDP2
        "stages": [row["stage"] for row in state.compression.rows],
        "metrics": {k: v for k, v in state.metrics.items() if k.startswith("compression/")},
        "artifact": (run_dir / "factorized_model.pt").is_file(),
    }


def _worker(out_dir: str) -> dict[str, dict[str, Any]]:
    with distributed("cpu", "gloo", 60) as env:
        run_dir = Path(out_dir) / f"rank{env.rank}"
        return {strategy: _one_run(strategy, env, run_dir / strategy) for strategy in CASES}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(240)
def test_every_rank_and_one_process_build_the_same_factorized_model(tmp_path):
    by_rank = launch(_worker, WORLD, str(tmp_path))
    for strategy in CASES:
        r0, r1 = by_rank[0][strategy], by_rank[1][strategy]
        assert r0["wrapper"] == ("DistributedDataParallel" if strategy == "ddp" else "FSDPCNN")
        assert r0["plan"] == r1["plan"] and r0["plan"], strategy
        assert _equal(r0["weights"], r1["weights"]), strategy  # the rank held the same
        assert _equal(r0["factorized"], r1["factorized"]), strategy
        assert torch.equal(r0["outputs"], r1["outputs"]), strategy
        assert r0["metrics"] == r1["metrics"]
        assert r0["stages"] == ["dense", "factorized", "fine-tuned"]
        assert r0["artifact"] and not r1["artifact"]  # rank 0 exports
        torch.testing.assert_close(r0["outputs"], r0["dense_outputs"], rtol=1e-4, atol=1e-5)

        # One process: the same plan on rank 0's weights, factorized here.
        cfg = _config(strategy)
        splits = build_data(cfg)
        model = build_model(cfg, splits)
        model.load_state_dict(r0["weights"])
        one_process = apply_plan(copy.deepcopy(model), r0["plan"]).eval()
        for name in r0["plan"]:
            fill_factors(
                one_process.get_submodule(name),
                model.get_submodule(name),
                *svd(model.get_submodule(name)),
            )
        test_x = torch.stack([x for x, _ in splits.test])
        test_y = torch.stack([y for _, y in splits.test])
        with torch.no_grad():
            torch.testing.assert_close(
                one_process(_probe(strategy)), r0["outputs"], rtol=1e-5, atol=1e-6
            )
            accuracy = (one_process(test_x).argmax(-1) == test_y).double().mean().item()
        assert r0["metrics"]["compression/fine-tuned/test_accuracy"] == pytest.approx(accuracy)
        assert isinstance(one_process.get_submodule(next(iter(r0["plan"]))), nn.Sequential)
