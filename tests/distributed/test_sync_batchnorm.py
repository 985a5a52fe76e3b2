"""Batch norm across ranks: what each strategy makes of BatchNorm's statistics, on 2-rank runs.

The reference for the statistics is BatchNorm's own update written out: after the first step,
``running_mean = m * mean(x)`` and ``running_var = (1 - m) + m * var(x)`` (unbiased), per
channel, of the input x the layer saw. Without `parallel.sync_batchnorm`, DDP normalizes each
rank by its own share of the batch, so the statistics are those of the local x and the run
differs from one process on the global batch. With it (SyncBatchNorm, GPUs only in torch 2.13)
x is the global batch, and the run is one process's. On the CPU, sync_batchnorm is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.config import CheckpointConfig, ConfigError, DataConfig, ParallelConfig, TrainConfig
from trainer.distributed.env import DistEnv, distributed
from trainer.distributed.launch import launch
from trainer.distributed.parallelize import unwrap
from trainer.pruning.shrink import full_state_dict

pytestmark = pytest.mark.distributed

WORLD = 2
GLOBAL_BATCH = 32
MOMENTUM = 0.1  # torch's BatchNorm default
CPU_ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
CNN = {"_target_": "trainer.models.CNN", "channels": [4, 8], "hidden": 16, "batch_norm": True}
STRUCTURED = {
    "_target_": "trainer.callbacks.pruning.Pruning",
    "method": "structured",
    "scope": "layer",
    "sparsity": 0.5,
    "finetune_epochs": 1,  # pruned before the first step: the whole fit holds the masks
    "latency_repeats": 0,
}
# The runs a worker can make: (strategy, sync_batchnorm, param_dtype, callbacks, epochs).
RUNS: dict[str, tuple[str, bool, str, dict[str, Any], int]] = {
    "ddp": ("ddp", False, "fp32", {}, 1),
    "ddp_sync": ("ddp", True, "fp32", {}, 1),
    "tp": ("tp", False, "fp32", {}, 1),
    "fsdp_bf16_pruned": ("fsdp", False, "bf16", {"pruning": STRUCTURED}, 1),
}


def make_config(run: str, world: int, device: str = "cpu", backend: str = "gloo") -> TrainConfig:
    strategy, sync, param_dtype, callbacks, epochs = RUNS[run]
    if world == 1:  # the reference: one process, the global batch, nothing wrapped
        strategy, sync = "none", False
    dp, _ = ParallelConfig(strategy=strategy).degrees(world)
    return TrainConfig(
        data=DataConfig(
            dataset={
                "_target_": "trainer.data.datasets.synthetic",
                "num_samples": 320,  # 256 training samples: 8 steps of the global batch
                "input_shape": [1, 16],
                "num_classes": 4,
            },
            batch_size=GLOBAL_BATCH // dp,
            eval_batch_size=64,
        ),
        model=CNN,
        optim={"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9},
        schedule=None,
        parallel=ParallelConfig(
            strategy=strategy,
            backend=backend,
            timeout_s=60,
            sync_batchnorm=sync,
            param_dtype=param_dtype,
        ),
        callbacks=callbacks,
        logger={},
        checkpoint=CheckpointConfig(save_final=False),
        device=device,
        max_epochs=epochs,
        grad_clip=0.0,
        val_every_epochs=0,
        test_after_fit=False,
        log_every_steps=4,
    )


class FirstStep(Callback):
    """Each BatchNorm's input in the first training forward, and its statistics after step 1."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_fit_start(self, state) -> None:
        for name, module in unwrap(state.model).named_modules():
            if isinstance(module, _BatchNorm):
                module.register_forward_hook(self._keep(name))

    def _keep(self, name: str):
        def hook(module, args, output):
            if module.training and name not in self.inputs:
                self.inputs[name] = args[0].detach().float().cpu()

        return hook

    def on_step_end(self, state) -> None:
        if state.step == 1:
            for name, module in unwrap(state.model).named_modules():
                if isinstance(module, _BatchNorm):
                    self.stats[name] = (
                        module.running_mean.detach().cpu().clone(),
                        module.running_var.detach().cpu().clone(),
                    )


def first_update(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's running statistics after one batch `x` (N, C, *spatial), from mean 0, var 1."""
    per_channel = x.transpose(0, 1).flatten(1)
    mean = MOMENTUM * per_channel.mean(1)
    var = (1 - MOMENTUM) + MOMENTUM * per_channel.var(1, unbiased=True)
    return mean, var


def fit(cfg: TrainConfig, env: DistEnv, run_dir: Path) -> dict[str, Any]:
    """One run: what it ends with (full weights and statistics) and what its first step saw."""
    trainer, _ = build_trainer(cfg, env, run_dir)
    first = FirstStep()
    trainer.callbacks.append(first)
    state = trainer.fit()
    result: dict[str, Any] = {
        "state": full_state_dict(trainer.model),  # a collective under FSDP2
        "inputs": first.inputs,
        "stats": first.stats,
        "steps": state.step,
        "norm_types": sorted(
            {type(m).__name__ for m in unwrap(trainer.model).modules() if isinstance(m, _BatchNorm)}
        ),
    }
    if trainer.callbacks and hasattr(trainer.callbacks[0], "masks"):
        pruning = trainer.callbacks[0]
        digest = hashlib.sha256()
        for name in sorted(pruning.masks):
            digest.update(name.encode() + pruning.masks[name].to(torch.uint8).numpy().tobytes())
        result["masks"] = pruning.masks
        result["mask_digest"] = digest.hexdigest()
        result["report"] = pruning.report
    return result


def _worker(runs: list[str], device: str, backend: str, out_dir: str) -> dict[str, Any]:
    with distributed(device, backend, 60) as env:
        results = {}
        for run in runs:
            cfg = make_config(run, WORLD, device, backend)
            results[run] = fit(cfg, env, Path(out_dir) / f"{run}{env.rank}")
            dist.barrier()
        return results


def one_process(run: str, tmp_path: Path) -> dict[str, Any]:
    return fit(make_config(run, 1), CPU_ENV, tmp_path / f"{run}_one")


def assert_local_statistics(ranks: list[dict[str, Any]]) -> None:
    """Each rank's statistics after step 1 are those of its own share of the first batch, not
    of the global batch."""
    for rank in ranks:
        assert rank["stats"].keys() == rank["inputs"].keys() == {"features.1", "features.5"}
    for name in ranks[0]["stats"]:
        global_mean, _ = first_update(torch.cat([r["inputs"][name] for r in ranks]))
        for r in ranks:
            mean, var = first_update(r["inputs"][name])
            torch.testing.assert_close(r["stats"][name][0], mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["stats"][name][1], var, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(r["stats"][name][0], global_mean, atol=1e-4)


def assert_global_statistics(ranks: list[dict[str, Any]]) -> None:
    for name in ranks[0]["stats"]:
        mean, var = first_update(torch.cat([r["inputs"][name] for r in ranks]))
        for r in ranks:
            torch.testing.assert_close(r["stats"][name][0], mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["stats"][name][1], var, rtol=1e-5, atol=1e-6)


def statistics(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------ CPU, gloo


@pytest.mark.timeout(240)
def test_batch_norm_under_ddp_tp_and_fsdp2(tmp_path):
    runs = ["ddp", "tp", "fsdp_bf16_pruned"]
    ranks = [
        r for _, r in sorted(launch(_worker, WORLD, runs, "cpu", "gloo", str(tmp_path)).items())
    ]

    # DDP without sync: each rank's own statistics, so not one process's run.
    ddp = [r["ddp"] for r in ranks]
    assert ddp[0]["norm_types"] == ["BatchNorm1d"]
    assert_local_statistics(ddp)
    reference = one_process("ddp", tmp_path)
    assert ddp[0]["steps"] == reference["steps"] == 256 // GLOBAL_BATCH
    assert max_difference(statistics(ddp[0]["state"]), statistics(reference["state"])) > 1e-3

    # Tensor parallelism shards the CNN's head; its BatchNorms, replicated, see the whole batch
    # on every rank: the run is one process's.
    for r in ranks:
        assert max_difference(r["tp"]["state"], reference["state"]) < 1e-5

    # FSDP2 computing in bf16 keeps each BatchNorm in fp32; structured pruning masks the
    # BatchNorm entries of the pruned channels on every rank alike, and shrinks them away.
    a, b = ranks[0]["fsdp_bf16_pruned"], ranks[1]["fsdp_bf16_pruned"]
    assert a["mask_digest"] == b["mask_digest"]
    assert a["steps"] == 256 // GLOBAL_BATCH
    for layer, norm in (("features.0", "features.1"), ("features.4", "features.5")):
        dead = ~a["masks"][f"{layer}.weight"].flatten(1).any(1)
        assert int(dead.sum()) == len(dead) // 2
        for param in ("weight", "bias"):
            assert torch.equal(a["masks"][f"{norm}.{param}"], ~dead)
            assert torch.count_nonzero(a["state"][f"{norm}.{param}"][dead]) == 0
    assert "shrink_skipped" not in a["report"]
    assert a["report"]["shrunk_shapes"]["features.1.running_mean"] == [2]
    assert a["report"]["shrunk_params"] < a["report"]["params"]


def test_sync_batchnorm_is_refused_where_it_cannot_run(tmp_path):
    """On the CPU (torch's SyncBatchNorm needs a GPU), on a model without BatchNorm, and with a
    strategy other than ddp: one line naming the key, before anything trains."""
    cfg = make_config("ddp_sync", WORLD)
    with pytest.raises(ConfigError, match="^parallel.sync_batchnorm: torch's SyncBatchNorm runs"):
        build_trainer(cfg, CPU_ENV, tmp_path)
    cfg.model = {**CNN, "batch_norm": False}
    with pytest.raises(ConfigError, match="^parallel.sync_batchnorm: CNN has no BatchNorm layer"):
        build_trainer(cfg, CPU_ENV, tmp_path)
    for strategy in ("none", "fsdp", "tp", "fsdp_tp"):
        with pytest.raises(ConfigError, match="^parallel.sync_batchnorm: applies to ddp only"):
            ParallelConfig(strategy=strategy, sync_batchnorm=True)


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm needs a CUDA device")
@pytest.mark.timeout(300)
def test_sync_batchnorm_statistics_are_the_global_batch(tmp_path):
    """With sync_batchnorm the 2-rank DDP run is the one-process run on the global batch; without
    it, it is not. (Two ranks share one GPU over gloo when there is only one.)"""
    backend = "nccl" if torch.cuda.device_count() >= WORLD else "gloo"
    by_rank = launch(_worker, WORLD, ["ddp_sync", "ddp"], "cuda", backend, str(tmp_path))
    ranks = [r for _, r in sorted(by_rank.items())]
    synced = [r["ddp_sync"] for r in ranks]
    assert synced[0]["norm_types"] == ["SyncBatchNorm"]
    assert_global_statistics(synced)
    reference = one_process("ddp", tmp_path)  # on the CPU: the same run on the global batch
    assert max_difference(synced[0]["state"], reference["state"]) < 1e-4
    assert_local_statistics([r["ddp"] for r in ranks])
    assert (
        max_difference(statistics(ranks[0]["ddp"]["state"]), statistics(reference["state"])) > 1e-3
    )
