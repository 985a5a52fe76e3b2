"""`Quantize` on 2-rank gloo runs (CPU): DDP (static int8, calibrated) and FSDP2 (dynamic int8,
the full weights gathered from DTensor shards), one process group.

Each rank returns its int8 model's outputs on fixed inputs, its float weights and its report
rows; the test checks that both ranks hold the same int8 model, that one process quantizing the
same float weights from the same calibration samples builds it too, and that the accuracy summed
across ranks equals the one-process accuracy of that model on the whole test split.
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
from trainer.compress.samples import SAMPLE_SEED
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
MODEL = {"_target_": "trainer.models.CNN", "channels": [4], "hidden": 8}
SHAPE = [1, 16]
RUNS = {"ddp": "static", "fsdp": "dynamic"}
CALIBRATION = (2, 32)  # batches, batch size
PROBE = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))


def _config(strategy: str, mode: str) -> TrainConfig:
    quantize = {
        "_target_": "trainer.callbacks.quantize.Quantize",
        "mode": mode,
        "calibration_batches": CALIBRATION[0],
        "calibration_batch_size": CALIBRATION[1],
        **FAST_LATENCY,
    }
    return two_rank_config(strategy, MODEL, SHAPE, {"quantize": quantize})


def _one_run(strategy: str, env: DistEnv, run_dir: Path) -> dict[str, Any]:
    trainer, _ = build_trainer(_config(strategy, RUNS[strategy]), env, run_dir)
    state = trainer.fit()
    weights = full_state_dict(trainer.model)  # a collective under FSDP2
    (callback,) = trainer.callbacks
    with torch.no_grad():
        outputs = callback.quantized(PROBE)
    return {
        "wrapper": type(trainer.model).__name__,
        "outputs": outputs,
        "weights": weights,
        "metrics": {k: v for k, v in state.metrics.items() if k.startswith("compression/")},
        "artifact": (run_dir / "quantized_model.pt").is_file(),
    }


def _worker(out_dir: str) -> dict[str, dict[str, Any]]:
    with distributed("cpu", "gloo", 60) as env:
        run_dir = Path(out_dir) / f"rank{env.rank}"
        run_dir.mkdir(parents=True)
        return {strategy: _one_run(strategy, env, run_dir / strategy) for strategy in RUNS}


@pytest.mark.timeout(240)
def test_every_rank_and_one_process_build_the_same_int8_model(tmp_path):
    by_rank = launch(_worker, WORLD, str(tmp_path))
    splits = build_data(_config("none", "static"))
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    count = CALIBRATION[0] * CALIBRATION[1]
    calibration = torch.stack([splits.train[int(i)][0] for i in order[:count]])
    test_x = torch.stack([x for x, _ in splits.test])
    test_y = torch.stack([y for _, y in splits.test])
    for strategy, mode in RUNS.items():
        r0, r1 = by_rank[0][strategy], by_rank[1][strategy]
        assert r0["wrapper"] == ("DistributedDataParallel" if strategy == "ddp" else "FSDPCNN")
        assert all(torch.equal(r0["weights"][k], v) for k, v in r1["weights"].items())
        assert torch.equal(r0["outputs"], r1["outputs"]), strategy
        assert r0["metrics"] == r1["metrics"]
        assert r0["artifact"] and not r1["artifact"]  # rank 0 exports

        model = CNN(input_shape=SHAPE, num_classes=4, channels=[4], hidden=8)
        model.load_state_dict(r0["weights"])
        one_process = quantize(model.eval(), mode, list(calibration.split(CALIBRATION[1])))
        with torch.no_grad():
            assert torch.equal(one_process(PROBE), r0["outputs"]), strategy
            accuracy = (one_process(test_x).argmax(-1) == test_y).double().mean().item()
        stage = f"quantized_{mode}"
        assert r0["metrics"][f"compression/{stage}/test_accuracy"] == pytest.approx(accuracy)
