"""The tiny GPT on GPU: samples/s, tokens/s and MFU for fp32, bf16, torch.compile, and DDP and
FSDP2 over NCCL, each a real `hooktrain` run whose figures come from its summary.json.

    python -m benchmarks.bench_gpu                    # on a CUDA machine: ~5 minutes
    python -m benchmarks.bench_gpu --quick            # a few steps per variant
    python -m benchmarks.bench_gpu --device cpu --quick   # the same harness on CPU (no MFU)

The workload is `experiment=text_gpt` (bytes of the Python standard library, block 128) with the
model and batch of `--size`. DDP and FSDP2 run under torchrun with one process per visible GPU
(`--nproc`), NCCL on CUDA. MFU is against the GPU's dense bf16 peak (`trainer/throughput.py`),
counted as torchtitan does; throughput excludes the first step (compilation, warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_gpu.py`

from benchmarks.common import REPO, machine, markdown_table  # noqa: E402

SIZES = {  # model and per-process batch: "tiny" is the recipe's own, "small" fills a GPU better
    "tiny": [],
    "small": ["model.dim=512", "model.depth=8", "model.heads=8", "data.batch_size=64"],
}


def variants(nproc: int, cuda: bool) -> dict[str, tuple[list[str], int]]:
    """name -> (overrides, processes). On CPU (a check of the harness): bf16 and compile left out."""
    if not cuda:
        return {"fp32": ([], 1), f"DDP x{nproc}": (["parallel=ddp"], nproc)}
    bf16 = ["precision=bf16"]
    return {
        "fp32": ([], 1),
        "bf16": (bf16, 1),
        "bf16 + compile": ([*bf16, "compile=true"], 1),
        f"DDP x{nproc} (NCCL)": ([*bf16, "parallel=ddp"], nproc),
        f"FSDP2 x{nproc} (NCCL), bf16 params": (
            [*bf16, "parallel=fsdp", "parallel.param_dtype=bf16"],
            nproc,
        ),
    }


def run(overrides: list[str], processes: int, run_dir: Path) -> dict:
    launcher = [sys.executable]
    if processes > 1 or any(o.startswith("parallel=") for o in overrides):
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    command = [*launcher, "-m", "trainer", *overrides, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=max(torch.cuda.device_count(), 1))
    parser.add_argument("--quick", action="store_true", help="10 steps per variant, tiny size")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu to try the harness")
    if args.quick:
        args.steps, args.size = 10, "tiny"
    common = [
        "experiment=text_gpt",
        f"device={args.device}",
        f"max_steps={args.steps}",
        "logger=none",
        "test_after_fit=false",
        "checkpoint.save_final=false",
        *SIZES[args.size],
    ]
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"Machine: {machine()}; GPU: {gpu}; size {args.size}, {args.steps} steps.\n")
    rows = []
    for name, (overrides, processes) in variants(args.nproc, cuda).items():
        with tempfile.TemporaryDirectory() as tmp:
            summary = run([*common, *overrides], processes, Path(tmp) / "run")
        mfu = summary.get("mfu")
        rows.append(
            [
                name,
                summary["world_size"],
                f"{summary['train_step_samples_per_second']:,.0f}",
                f"{summary['train_step_tokens_per_second']:,.0f}",
                f"{summary['train_step_tokens_per_second_per_rank']:,.0f}",
                f"{100 * mfu:.1f}%" if mfu else "-",
                f"{summary['train/loss']:.3f}",
            ]
        )
        print(f"  {name}: done", file=sys.stderr)
    headers = [
        "variant",
        "ranks",
        "samples/s",
        "tokens/s",
        "tokens/s per rank",
        "MFU",
        "train/loss",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
