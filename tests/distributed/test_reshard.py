"""Checkpoints move between layouts: saved sharded by FSDP2 over 2 ranks, resumed by 1 process
(and by DDP over 2), continuing exactly where the sharded run would have gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from trainer.build import build_trainer
from trainer.checkpoint import CheckpointError
from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig
from trainer.distributed.env import DistEnv, distributed
from trainer.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def config(strategy: str, batch_size: int, max_steps: int, resume: str | None) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(
            dataset={
                "_target_": "trainer.data.datasets.synthetic",
                "num_samples": 640,
                "input_shape": [1, 8, 8],
            },
            batch_size=batch_size,
        ),
        model={
            "_target_": "trainer.models.TransformerClassifier",
            "dim": 32,
            "depth": 2,
            "heads": 4,
        },
        # SGD with momentum: its buffers are optimizer state to reshard. (AdamW would normalise the
        # attention key bias's gradient, zero up to rounding noise, into full-size updates.)
        optim={"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9},
        parallel=ParallelConfig(strategy=strategy, backend="gloo", timeout_s=60),
        checkpoint=CheckpointConfig(every_steps=6, save_final=True),
        max_steps=max_steps,
        val_every_epochs=0,
        test_after_fit=False,
        resume=resume,
    )


def _worker(cfg: TrainConfig, run_dir: str) -> dict[str, torch.Tensor]:
    with distributed("cpu", "gloo", 60) as env:
        trainer, _ = build_trainer(cfg, env, Path(run_dir))
        trainer.fit()
        full = get_model_state_dict(
            trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return {k: v.clone() for k, v in full.items()}


def test_fsdp_checkpoint_resumes_in_one_process_and_under_ddp(tmp_path):
    torch.set_num_threads(1)
    # The reference: FSDP2 over 2 ranks (per-rank batch 16) runs 12 steps straight.
    straight = launch(_worker, 2, config("fsdp", 16, 12, None), str(tmp_path / "straight"))[0]
    # FSDP2 over 2 ranks runs 6 steps and saves a sharded checkpoint ...
    launch(_worker, 2, config("fsdp", 16, 6, None), str(tmp_path / "sharded"))
    saved = tmp_path / "sharded" / "checkpoints" / "step_00000006"
    assert {p.name for p in saved.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    # ... which one process (global batch 32) resumes and finishes ...
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    single, _ = build_trainer(config("none", 32, 12, str(saved)), env, tmp_path / "single")
    assert single.fit().step == 12
    # A different global batch would point the saved mid-epoch position at other samples.
    halved, _ = build_trainer(config("none", 16, 12, str(saved)), env, tmp_path / "halved")
    with pytest.raises(CheckpointError, match=r"step_00000006: saved in the middle of an epoch "
                       r"with a global batch of 32 samples .* but this run's is 16"):  # fmt: skip
        halved.fit()
    # ... and so does DDP over 2 ranks.
    ddp = launch(_worker, 2, config("ddp", 16, 12, str(saved)), str(tmp_path / "ddp"))[0]
    for name, value in straight.items():
        torch.testing.assert_close(
            single.model.state_dict()[name], value, atol=1e-5, rtol=1e-4, msg=name
        )
        key = name if name in ddp else f"module.{name}"
        torch.testing.assert_close(ddp[key], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_a_sweep_job_runs_as_a_two_process_job(tmp_path):
    """`hooktrain -m ... parallel.nproc_per_node=2`: each job of the sweep is launched through
    torchrun's engine as a 2-rank job, in its own folder."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "trainer", "-m", "model=mlp,cnn", "parallel=ddp",
        "parallel.nproc_per_node=2", "data=synthetic", "data.dataset.num_samples=256",
        "data.dataset.input_shape=[1,8,8]", "data.batch_size=16", "max_steps=4", "logger=none", "callbacks=none",
        f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 4
