"""hooktrain against a plain PyTorch loop in one process: throughput, peak memory, time to first step.

    python -m benchmarks.bench_loop            # ~10 minutes on 2 CPU cores
    python -m benchmarks.bench_loop --quick    # smoke run: a few steps, one fresh-process pair
    python -m benchmarks.bench_loop --identical --models mlp transformer   # A/A, ~4 minutes

Workloads: the mlp, cnn, gru and transformer recipes on synthetic (1, 32, 32) images, 10 classes,
with the batch sizes in `benchmarks.common.BATCH`. hooktrain runs its default job (`recipes/`:
WarmupCosine, the rich progress bar, TensorBoard + jsonl loggers (`--override +logger=wandb` adds wandb offline), AdamW,
grad_clip 1.0) with validation, test and checkpoints off; the plain loop
(`benchmarks.common.PlainLoop`) does the same work.

1. Throughput: both loops in this process on one intra-op thread, in alternating segments of
   `--steps` steps (`benchmarks.common.interleave`), `--rounds` of each after a warm-up round, in
   `--blocks` blocks, each with a freshly built trainer whose model, optimizer and training set
   the plain loop trains too (`--separate-builds`: its own); the ratio is the median over blocks
   of `benchmarks.common.per_position_ratio`. The process runs with hooktrain's malloc settings
   (`trainer.allocator`), which the plain loop shares.
2. Fresh processes: the real CLI (`python -m trainer ...`, as the default job and with
   `logger=none`) and the plain loop (`python -m benchmarks.common`) each in a new process, for
   each model and for a larger workload (`LARGER_WORKLOAD`, the transformer at batch 1024): peak
   RSS, the growth from just before the first step to the peak (`logger=none`: the loggers
   start in the background during the first steps, so their imports would land in that
   window), and the wall time from starting the process (measured here) to the end of the first
   step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_loop.py`

from benchmarks.common import (  # noqa: E402
    BATCH,
    BENCH_ENV,
    COMPARISON,
    REPO,
    add_override_argument,
    cli_overrides,
    comparison,
    described,
    hooktrain_config,
    identical_blocks,
    identical_table,
    interleaved_blocks,
    load_average,
    machine,
    markdown_table,
    median,
    plain_spec,
    pooled,
    wait_for_quiet,
)
from trainer.allocator import keep_freed_memory  # noqa: E402


def throughput(
    models: list[str],
    blocks: int,
    rounds: int,
    steps: int,
    share: bool,
    overrides: list[str],
    plain_per_sample: bool,
) -> str:
    from trainer.distributed.env import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    rows = []
    for model in models:
        cfg = hooktrain_config(model, steps * (rounds + 1), *overrides)
        batch = cfg.data.batch_size
        results = interleaved_blocks(cfg, env, blocks, rounds, steps, share, plain_per_sample)
        step_ms = 1000 * batch / median(pooled(results, "plain"))
        rows.append([model, batch, f"{step_ms:.1f}", *comparison(results, cfg.log_every_steps)])
        runs = {k: [round(sps) for sps in pooled(results, k)] for k in ("plain", "hooktrain")}
        print(f"  {model} samples/s per segment: {runs}", file=sys.stderr)
    return markdown_table(["model", "batch", "plain step (ms)", *COMPARISON], rows)


def identical_loops(models: list[str], blocks: int, rounds: int, steps: int, separate: bool) -> str:
    """The same measurement with the plain loop on both sides: its distance from 1.0x is the
    measurement's own error on this machine."""
    cfgs = {model: hooktrain_config(model, steps * (rounds + 1)) for model in models}
    results = {
        m: identical_blocks(cfg, blocks, rounds, steps, not separate) for m, cfg in cfgs.items()
    }
    return identical_table(results, cfgs[models[0]].log_every_steps)


def fresh_process(
    model: str, variant: str, steps: int, batch: int | None = None, overrides: Sequence[str] = ()
) -> dict[str, float]:
    """Run one variant in a new process; returns its first-step time and RSS figures. Variants:
    "plain", "hooktrain" (the default job's setup) and "hooktrain, logger=none"."""
    with tempfile.TemporaryDirectory() as tmp:
        report, run_dir = Path(tmp) / "report.json", Path(tmp) / "run"
        if variant.startswith("hooktrain"):
            command = [
                "-m",
                "trainer",
                *cli_overrides(model, steps, batch),
                f"hydra.run.dir={run_dir}",
                "allowed_targets=[trainer.,torch.optim.,torch.nn.,benchmarks.]",
                "+callbacks.probe._target_=benchmarks.common.FirstStepProbe",
                f"+callbacks.probe.report={report}",
                *(["logger=none"] if variant.endswith("logger=none") else []),
                *overrides,
            ]
        else:
            spec = plain_spec(hooktrain_config(model, steps, *overrides, batch=batch))
            command = ["-m", "benchmarks.common", json.dumps(spec), str(report)]
        env = {**os.environ, **BENCH_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        started = time.time()
        subprocess.run(
            [sys.executable, *command], cwd=tmp, env=env, check=True, capture_output=True
        )
        facts = json.loads(report.read_text())
        facts["to_first_step"] = facts["first_step_wall"] - started
        facts["growth"] = facts["peak_rss_mib"] - facts["rss_before_first_step_mib"]
        if variant.startswith("hooktrain"):
            summary = json.loads((run_dir / "summary.json").read_text())
            facts["summary_to_first_step"] = summary["seconds_to_first_step"]
        return facts


def fresh_processes(workloads: list[tuple[str, int]], steps: int, overrides: list[str]) -> str:
    """The fresh-process table: one row per (model, batch)."""
    rows = []
    for model, batch in workloads:
        plain, hook, quiet = (
            fresh_process(model, variant, steps, batch, overrides)
            for variant in ("plain", "hooktrain", "hooktrain, logger=none")
        )
        rows.append(
            [
                model,
                batch,
                f"{plain['peak_rss_mib']:.0f} / {hook['peak_rss_mib']:.0f} / "
                f"{quiet['peak_rss_mib']:.0f}",
                f"{hook['peak_rss_mib'] / plain['peak_rss_mib']:.2f}x / "
                f"{quiet['peak_rss_mib'] / plain['peak_rss_mib']:.2f}x",
                f"{plain['growth']:.0f} / {quiet['growth']:.0f}",
                f"{quiet['growth'] / plain['growth']:.2f}x",
                f"{plain['to_first_step']:.1f} / {hook['to_first_step']:.1f}",
                f"{hook['summary_to_first_step']:.1f}",
            ]
        )
    headers = [
        "model",
        "batch",
        "peak RSS MiB: plain / hooktrain / hooktrain logger=none",
        "peak ratio: hooktrain / logger=none",
        "training RSS growth MiB: plain / hooktrain logger=none",
        "growth ratio",
        "s to first step: plain / hooktrain",
        "hooktrain summary.json seconds_to_first_step",
    ]
    return markdown_table(headers, rows)


# Also measured in a fresh process: a workload whose training needs ~0.5 GiB (the plain script
# grows by ~580 MiB), beside the benchmark's small ones (20-50 MiB), on which the fixed cost of
# the default job's imports (~50 MiB) dominates the peak-memory ratio.
LARGER_WORKLOAD = ("transformer", 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    parser.add_argument("--models", nargs="+", choices=list(BATCH), default=list(BATCH))
    parser.add_argument("--blocks", type=int, default=6, help="fresh pairs of loops per model")
    parser.add_argument(
        "--rounds", type=int, default=8, help="timed segments of each loop per block"
    )
    parser.add_argument("--steps", type=int, default=40, help="steps per segment")
    parser.add_argument(
        "--wait-load",
        type=float,
        default=0,
        help="first wait (<= 10 min) until the 1-minute load average is below this",
    )
    parser.add_argument(
        "--identical",
        action="store_true",
        help="instead, measure the plain loop against itself (A/A: the measurement's own error)",
    )
    add_override_argument(parser)
    parser.add_argument(
        "--plain-per-sample",
        action="store_true",
        help="in the throughput table, the plain loop fetches sample by sample, as a DataLoader "
        "with batch_size does, while hooktrain fetches whole batches: hooktrain against the usual "
        "hand-written loop (the fresh processes are unchanged)",
    )
    parser.add_argument(
        "--separate-builds",
        action="store_true",
        help="the plain loop builds its own model, optimizer and data (see interleaved_blocks)",
    )
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.rounds, args.steps = 1, 1, 5
    if args.wait_load:
        wait_for_quiet(args.wait_load)
    os.environ.update(BENCH_ENV)
    torch.set_num_threads(1)
    keep_freed_memory()  # as build_trainer does: the A/A runs too, which build no trainer

    print(f"Machine: {machine()}; 1 intra-op thread{described(args.override)}.\n")
    if args.identical:
        print(f"Plain loop against plain loop, {args.blocks} blocks of {args.rounds} rounds:\n")
        print(
            identical_loops(args.models, args.blocks, args.rounds, args.steps, args.separate_builds)
        )
        return
    print(
        f"Throughput: {args.blocks} blocks of {args.rounds} rounds of {args.steps}-step segments, "
        "same process:\n"
    )
    if args.plain_per_sample:
        print("The plain loop fetches sample by sample (--plain-per-sample).\n")
    share = not args.separate_builds
    rows = throughput(
        args.models,
        args.blocks,
        args.rounds,
        args.steps,
        share,
        args.override,
        args.plain_per_sample,
    )
    print(rows)
    workloads = [(model, BATCH[model]) for model in args.models]
    if args.quick:
        workloads, steps = workloads[:1], 5
    else:
        workloads, steps = [*workloads, LARGER_WORKLOAD], 20
    print(f"\nFresh processes ({steps} steps each):\n")
    print(fresh_processes(workloads, steps, args.override))
    print(f"\nLoad average at the end: {load_average()} (1, 5, 15 min)")


if __name__ == "__main__":
    main()
