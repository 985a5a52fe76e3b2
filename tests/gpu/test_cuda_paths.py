"""The CUDA paths: bf16 and fp16 autocast, torch.compile, NCCL with FSDP2, and MFU in the summary.

Skipped on machines without CUDA (CI has none); run them on a GPU machine with
`python -m pytest tests/gpu -q`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TINY = ["data=synthetic", "data.dataset.num_samples=2048", "model=mlp", "max_steps=30", "logger=none", "callbacks=none"]  # fmt: skip


def run_cli(args: list[str], tmp_path, launcher: list[str] | None = None) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [*(launcher or [sys.executable]), "-m", "trainer", *args, f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision, tmp_path):
    summary = run_cli([*TINY, f"precision={precision}"], tmp_path)
    assert summary["train/loss"] < 2.3 and summary["test/accuracy"] > 0.2


def test_compile_and_mfu_for_the_tiny_gpt(tmp_path):
    summary = run_cli(["experiment=text_gpt", "max_steps=40", "precision=bf16", "compile=true", "logger=none"], tmp_path)  # fmt: skip
    assert summary["train_step_tokens_per_second"] > 0
    assert 0 < summary.get("mfu", 0) < 1, "MFU needs the GPU's peak in trainer/throughput.py"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_over_nccl(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    summary = run_cli([*TINY, "parallel=fsdp", "parallel.param_dtype=bf16"], tmp_path, torchrun)
    assert summary["world_size"] == 2
