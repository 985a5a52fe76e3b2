"""`QuantizationAwareTraining` on 2-rank gloo runs (CPU), DDP and FSDP2 in one process group:
the fake-quantized epochs train on the wrapped (FSDP2: sharded) parameters, the post-training row
at the phase's start and the int8 conversion at the end are collectives on every rank.

Each rank returns its int8 models' outputs on fixed inputs (QAT's, and the PTQ one of the phase's
start), its final float weights and its report rows; the test checks that both ranks hold the
same models and rows, that one process quantizing the same float weights builds the same int8
model, and that the reported accuracy is that model's on the whole test split.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.compression_runs import FAST_LATENCY, two_rank_config
from trainer.build import build_data, build_trainer
from trainer.compress.quantize import quantize
from trainer.config import TrainConfig
from trainer.distributed.env import DistEnv, distributed
from trainer.distributed.launch import launch
from trainer.models import CNN
from trainer.pruning.shrink import full_state_dict

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao"),
]

WORLD = 2
SHAPE = [1, 16]
MODE = "dynamic"
STRATEGIES = ("ddp", "fsdp")
PROBE = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))


def _config(strategy: str) -> TrainConfig:
    qat = {
        "_target_": "trainer.callbacks.qat.QuantizationAwareTraining",
        "mode": MODE,
        "epochs": 1,
        **FAST_LATENCY,
    }
    model = {"_target_": "trainer.models.CNN", "channels": [4], "hidden": 8}
    return two_rank_config(strategy, model, SHAPE, {"qat": qat})


def _one_run(strategy: str, env: DistEnv, run_dir: Path) -> dict[str, Any]:
    trainer, _ = build_trainer(_config(strategy), env, run_dir)
    state = trainer.fit()
    weights = full_state_dict(trainer.model)  # a collective under FSDP2
    (callback,) = trainer.callbacks
    with torch.no_grad():
        outputs = {"qat": callback.quantized(PROBE), "ptq": callback.ptq.quantized(PROBE)}
    return {
        "wrapper": type(trainer.model).__name__,
        "outputs": outputs,
        "weights": weights,
        "metrics": {k: v for k, v in state.metrics.items() if k.startswith("compression/")},
        "artifact": (run_dir / "qat_model.pt").is_file(),
    }


def _worker(out_dir: str) -> dict[str, dict[str, Any]]:
    with distributed("cpu", "gloo", 60) as env:
        run_dir = Path(out_dir) / f"rank{env.rank}"
        run_dir.mkdir(parents=True)
        return {strategy: _one_run(strategy, env, run_dir / strategy) for strategy in STRATEGIES}


@pytest.mark.timeout(240)
def test_every_rank_and_one_process_build_the_same_qat_int8_model(tmp_path):
    by_rank = launch(_worker, WORLD, str(tmp_path))
    splits = build_data(_config("none"))
    test_x = torch.stack([x for x, _ in splits.test])
    test_y = torch.stack([y for _, y in splits.test])
    for strategy in STRATEGIES:
        r0, r1 = by_rank[0][strategy], by_rank[1][strategy]
        assert r0["wrapper"] == ("DistributedDataParallel" if strategy == "ddp" else "FSDPCNN")
        assert all(torch.equal(r0["weights"][k], v) for k, v in r1["weights"].items())
        for kind in ("qat", "ptq"):
            assert torch.equal(r0["outputs"][kind], r1["outputs"][kind]), (strategy, kind)
        assert r0["metrics"] == r1["metrics"]
        assert r0["artifact"] and not r1["artifact"]  # rank 0 exports
        stages = {name.split("/")[1] for name in r0["metrics"]}
        assert stages == {"dense", f"quantized_{MODE}", f"qat_{MODE}"}

        model = CNN(input_shape=SHAPE, num_classes=4, channels=[4], hidden=8)
        model.load_state_dict(r0["weights"])
        one_process = quantize(model.eval(), MODE)
        with torch.no_grad():
            assert torch.equal(one_process(PROBE), r0["outputs"]["qat"]), strategy
            accuracy = (one_process(test_x).argmax(-1) == test_y).double().mean().item()
        metric = f"compression/qat_{MODE}/test_accuracy"
        assert r0["metrics"][metric] == pytest.approx(accuracy)
