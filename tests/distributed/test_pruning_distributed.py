"""Pruning on 2-rank gloo runs (CPU): DDP with an MLP and with a user's residual CNN
(structured, Torch-Pruning's channel groups), FSDP2 with the CNN (DTensor shards).

Each rank gathers the full weights after the fit, checks them against its own full masks, and
all-gathers the masks' checksums; it returns what it saw, and the test compares both ranks:
identical full masks (and, for the residual CNN, those of one process), the exact target sparsity,
zeros in the weights exactly where the masks say, and (rank 0) an exported model that reloads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.pruning_models import FAST_ROWS, ResNet1d
from trainer.build import build_trainer
from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig
from trainer.distributed.env import DistEnv, distributed
from trainer.distributed.launch import launch
from trainer.models import CNN
from trainer.pruning.shrink import full_state_dict, load_pruned, plain_copy

pytestmark = pytest.mark.distributed

WORLD = 2

GRADUAL = {
    "schedule": "gradual",
    "sparsity": 0.8,
    "every_steps": 2,
    "finetune_epochs": 1,
    "scope": "global",
}
STRUCTURED = {"method": "structured", "scope": "layer", "sparsity": 0.5, "finetune_epochs": 1}
# Pruned before the first step: the masks come from the seeded initial weights alone, so one
# process must choose the very same channels.
AT_START = {**STRUCTURED, "finetune_epochs": 3}
MLP = ({"_target_": "trainer.models.MLP", "hidden": [32, 32]}, [8])
CNN_SPEC = ({"_target_": "trainer.models.CNN", "channels": [4, 8], "hidden": 16}, [1, 16])
RESNET = ({"_target_": "tests.pruning_models.ResNet1d", "channels": 8}, [2, 16])
# strategy -> {run name: (model, input shape, pruning)}; each strategy's runs share a process group.
CASES: dict[str, dict[str, tuple[dict[str, Any], list[int], dict[str, Any]]]] = {
    "ddp": {"gradual": (*MLP, GRADUAL), "residual": (*RESNET, AT_START)},
    "fsdp": {"gradual": (*CNN_SPEC, GRADUAL), "structured": (*CNN_SPEC, STRUCTURED)},
}


# ------------------------------------------------------------------------------ the ranks


def _config(case: str, name: str, report_dir: str) -> TrainConfig:
    model, input_shape, pruning = CASES[case][name]
    return TrainConfig(
        data=DataConfig(
            dataset={
                "_target_": "trainer.data.datasets.synthetic",
                "num_samples": 320,  # 256 train: 128 per rank, 8 steps of 16
                "input_shape": input_shape,
                "num_classes": 4,
            },
            batch_size=16,
            eval_batch_size=64,
        ),
        model=model,
        optim={"_target_": "torch.optim.AdamW", "lr": 1e-2},
        schedule=None,
        parallel=ParallelConfig(strategy=case, backend="gloo", timeout_s=60),
        callbacks={
            "pruning": {
                "_target_": "trainer.callbacks.pruning.Pruning",
                "report_dir": report_dir,
                **FAST_ROWS,
                **pruning,
            }
        },
        logger={},
        checkpoint=CheckpointConfig(save_final=False),
        device="cpu",
        max_epochs=3,
        log_every_steps=4,
        test_after_fit=False,
        allowed_targets=["trainer.", "torch.optim.", "torch.nn.", "tests."],
    )


def _checksum(masks: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].to(torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _one_run(case: str, name: str, env: DistEnv, out_dir: Path) -> dict[str, Any]:
    report_dir = out_dir / name
    trainer, _ = build_trainer(_config(case, name, str(report_dir)), env, out_dir)
    (cb,) = trainer.callbacks
    state = trainer.fit()

    full = full_state_dict(trainer.model)  # a collective under FSDP2
    zeros_match = all(torch.equal(full[k] != 0, m) for k, m in cb.masks.items() if k in cb._weights)
    total = sum(full[k].numel() for k in cb._weights)
    nonzero = sum(int(torch.count_nonzero(full[k])) for k in cb._weights)
    checksum = _checksum(cb.masks)
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, checksum)
    assert len(set(gathered)) == 1, f"ranks hold different masks: {gathered}"

    # The model as trained (DDP forward / FSDP2 forward, a collective) computes the same outputs
    # as the plain full-weight copy that is measured and shrunk.
    model, input_shape, _ = CASES[case][name]
    x = torch.randn(8, *input_shape, generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        wrapped_out = trainer.model(x)
        plain_out = plain_copy(trainer.model)(x)  # a collective under FSDP2
    result: dict[str, Any] = {
        "wrapper": type(trainer.model).__name__,
        "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        "steps": state.step,
        "pruned_steps": cb.pruned_steps,
        "checksum": checksum,
        "all_checksums": gathered,
        "mask_names": sorted(cb.masks),
        "zeros_match_masks": zeros_match,
        "sparsity": 1 - nonzero / total,
        "exact_target": round(cb.final * total) / total if cb.method == "unstructured" else None,
        "report_sparsity": cb.report["sparsity"],
        "metric_sparsity": state.metrics["pruning/sparsity"],
        "plain_matches_wrapped": bool(torch.allclose(wrapped_out, plain_out, atol=1e-5)),
    }
    if cb.method == "structured":
        result["row_fractions"] = {
            k: 1 - m.flatten(1).any(1).float().mean().item()
            for k, m in cb.masks.items()
            if k in cb._weights
        }
        result["shrunk_params"] = cb.report.get("shrunk_params")
        result["params"] = cb.report["params"]
    result["rows"] = [row["stage"] for row in state.compression.rows]
    if env.rank == 0:
        path = report_dir / "pruned_model.pt"
        if cb.method == "structured":  # the shrunk model: rebuilt from a fresh dense one
            dense = _fresh(model, input_shape)
            shrunk = load_pruned(dense, path).eval()
            with torch.no_grad():
                result["exported_equal"] = bool(torch.allclose(shrunk(x), plain_out, atol=1e-5))
        else:
            exported = torch.load(path, weights_only=True)
            result["exported_equal"] = all(torch.equal(exported[k], full[k]) for k in full)
        result["report_file"] = (report_dir / "compression_report.json").is_file()
    return result


def _fresh(model: dict[str, Any], input_shape: list[int]) -> torch.nn.Module:
    """A dense model of the run's config (the architecture the exported file was pruned from)."""
    args = {k: v for k, v in model.items() if k != "_target_"}
    cls = {"trainer.models.CNN": CNN, "tests.pruning_models.ResNet1d": ResNet1d}
    return cls[model["_target_"]](input_shape=input_shape, num_classes=4, **args)


def _worker(case: str, out_dir: str) -> dict[str, dict[str, Any]]:
    """One rank: the case's runs in turn in one process group; {run name: what this rank saw}."""
    with distributed("cpu", "gloo", 60) as env:
        run_dir = Path(out_dir) / f"run{env.rank}"
        return {name: _one_run(case, name, env, run_dir) for name in CASES[case]}


def run_ranks(case: str, tmp_path: Path) -> list[dict[str, Any]]:
    """[rank 0's result, rank 1's]; a failing rank raises ChildFailedError, with its traceback."""
    by_rank = launch(_worker, WORLD, case, str(tmp_path))
    return [by_rank[r] for r in range(WORLD)]


def _assert_common(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    assert r0["checksum"] == r1["checksum"]  # identical full masks on both ranks
    assert r0["all_checksums"] == r1["all_checksums"] == [r0["checksum"]] * WORLD
    assert r0["pruned_steps"] == r1["pruned_steps"]
    for r in (r0, r1):
        assert r["zeros_match_masks"], "the weights' zeros differ from the masks"
        assert r["plain_matches_wrapped"]
        assert r["report_sparsity"] == pytest.approx(r["sparsity"], abs=1e-12)
        assert r["metric_sparsity"] == pytest.approx(r["sparsity"], abs=1e-12)
    assert r0["sparsity"] == r1["sparsity"]
    assert r0["exported_equal"] and r0["report_file"]
    assert r0["rows"] == r1["rows"] and r0["rows"][0] == "dense"


# ------------------------------------------------------------------------------ the tests


@pytest.mark.timeout(180)
def test_ddp_gradual_and_residual_structured_pruning_identical_masks(tmp_path):
    r0, r1 = run_ranks("ddp", tmp_path)
    a, b = r0["gradual"], r1["gradual"]
    assert a["wrapper"] == "DistributedDataParallel"
    _assert_common(a, b)
    assert a["sparsity"] == pytest.approx(a["exact_target"], abs=1e-12)
    assert a["pruned_steps"][-1] <= a["steps"] - 8  # the last epoch fine-tunes at s_f

    # A user's residual CNN, pruned structurally (coupled channel groups) before the first step.
    a, b = r0["residual"], r1["residual"]
    _assert_common(a, b)
    assert a["pruned_steps"] == [0] and a["rows"] == ["dense", "pruned", "fine-tuned"]
    assert a["shrunk_params"] < 0.5 * a["params"]
    # One process, same seed, same config: the same channel groups and the same masks.
    cfg = _config("ddp", "residual", str(tmp_path / "one"))
    cfg.parallel = ParallelConfig()
    one = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    trainer, _ = build_trainer(cfg, one, tmp_path / "one")
    (cb,) = trainer.callbacks
    trainer.fit()
    assert _checksum(cb.masks) == a["checksum"]


@pytest.mark.timeout(180)
def test_fsdp_gradual_and_structured_pruning_identical_masks(tmp_path):
    r0, r1 = run_ranks("fsdp", tmp_path)
    a, b = r0["gradual"], r1["gradual"]
    assert a["wrapper"].startswith("FSDP") and a["param_types"] == ["DTensor"]
    _assert_common(a, b)
    assert a["sparsity"] == pytest.approx(a["exact_target"], abs=1e-12)

    a, b = r0["structured"], r1["structured"]
    _assert_common(a, b)
    assert a["pruned_steps"] == [16]  # before the first step of the last epoch
    # Whole rows / channels: half of each pruned layer; the output layer untouched.
    assert a["row_fractions"] == {
        "features.0.weight": 0.5,
        "features.3.weight": 0.5,
        "classifier.1.weight": 0.5,
    }
    assert "classifier.1.bias" in a["mask_names"]
    assert a["shrunk_params"] < 0.5 * a["params"]
    assert a["rows"] == ["dense", "pruned", "fine-tuned"]
