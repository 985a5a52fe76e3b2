"""hooktrain `parallel=ddp` against a plain DistributedDataParallel loop: 2 processes, gloo, CPU.

    python -m benchmarks.bench_ddp            # ~8 minutes on 2 CPU cores
    python -m benchmarks.bench_ddp --quick    # smoke run: a few steps
    python -m benchmarks.bench_ddp --identical --models mlp   # A/A, ~1.5 minutes

Both loops run in the same 2 processes, started once by `trainer.distributed.launch.launch`
(torchrun's elastic engine), one intra-op thread each, on one process group, alternating step
by step (`benchmarks.common.interleave`), in blocks with a freshly built trainer. The plain loop
(`benchmarks.common.PlainLoop`) trains the trainer's own `DistributedDataParallel` model with
its optimizer (`--separate-builds`: its own), drawing from `DistributedSampler(num_replicas=2)`,
gloo. hooktrain: `build_trainer`
with `parallel=ddp parallel.backend=gloo` (`ParallelConfig(strategy="ddp", backend="gloo")`) and
its default callbacks and loggers (rank 0). Workloads as in bench_loop with
`benchmarks.common.BATCH` per process, so the global batch is twice that; samples/s are global,
timed on rank 0.

Then the scaling on this machine: the plain loop in one process with the global batch, on one and
on two threads, against the two processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_ddp.py`

from benchmarks.common import (  # noqa: E402
    BATCH,
    BENCH_ENV,
    COMPARISON,
    PlainLoop,
    add_override_argument,
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
from trainer.distributed.env import distributed  # noqa: E402
from trainer.distributed.launch import launch  # noqa: E402

NPROC = 2


def _rank(cfgs: dict, blocks: int, rounds: int, steps: int, share: bool, identical: bool) -> dict:
    """One rank: each model's plain and hooktrain segments (`identical`: two plain loops),
    interleaved on one process group, in `blocks` blocks with both loops built afresh."""
    torch.set_num_threads(1)
    with distributed("cpu", "gloo", 300) as env:
        if identical:
            return {
                m: identical_blocks(cfg, blocks, rounds, steps, share) for m, cfg in cfgs.items()
            }
        return {
            model: interleaved_blocks(cfg, env, blocks, rounds, steps, share)
            for model, cfg in cfgs.items()
        }


def _one_process(spec: dict, threads: int, steps: int) -> float:
    """samples/s of the plain loop in this process on `threads` threads, after 5 warm-up steps."""
    torch.set_num_threads(threads)
    loop = PlainLoop(spec)
    for _ in range(5):
        loop.step()
    started = time.perf_counter()
    for _ in range(steps):
        loop.step()
    return steps * spec["batch_size"] / (time.perf_counter() - started)


def scaling(cfgs: dict, ddp: dict, rounds: int, steps: int) -> str:
    """The plain loop in one process with the global batch, on 1 and on 2 threads (alternating,
    `rounds` runs of `steps` steps each), against the 2 processes."""
    rows = []
    for model, cfg in cfgs.items():
        spec = {**plain_spec(cfg), "batch_size": NPROC * cfg.data.batch_size}
        one = {1: [], 2: []}
        for _ in range(rounds):
            for threads, runs in one.items():
                runs.append(_one_process(spec, threads, steps))
        cells = [median(one[1]), median(one[2])]
        cells += [median(pooled(ddp[model], "plain")), median(pooled(ddp[model], "hooktrain"))]
        speedup = cells[2] / max(cells[:2])
        rows.append([model, spec["batch_size"], *(f"{x:.0f}" for x in cells), f"{speedup:.2f}x"])
    headers = [
        "model",
        "global batch",
        "1 process, 1 thread",
        "1 process, 2 threads",
        "2 processes, plain DDP",
        "2 processes, hooktrain DDP",
        "plain DDP / best 1 process",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    parser.add_argument("--models", nargs="+", choices=list(BATCH), default=list(BATCH))
    parser.add_argument("--blocks", type=int, default=5, help="fresh pairs of loops per model")
    parser.add_argument(
        "--rounds", type=int, default=6, help="timed segments of each loop per block"
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
        help="instead, measure the plain DDP loop against itself (A/A: the measurement's own error)",
    )
    add_override_argument(parser)
    parser.add_argument(
        "--separate-builds",
        action="store_true",
        help="the plain loop builds its own model, optimizer and data (see interleaved_blocks)",
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.blocks, args.rounds, args.steps = args.models[:1], 1, 1, 5
    if args.wait_load:
        wait_for_quiet(args.wait_load)
    os.environ.update(BENCH_ENV)
    keep_freed_memory()  # the one-process runs of the scaling table: hooktrain's malloc settings
    print(
        f"Machine: {machine()}; {NPROC} processes x 1 intra-op thread, gloo{described(args.override)}.\n"
    )

    total = args.steps * (args.rounds + 1)
    cfgs = {
        m: hooktrain_config(m, total, "parallel=ddp", "parallel.backend=gloo", *args.override)
        for m in args.models
    }
    share = not args.separate_builds
    ddp = launch(_rank, NPROC, cfgs, args.blocks, args.rounds, args.steps, share, args.identical)[0]
    if args.identical:
        print(f"Plain DDP loop against itself, {args.blocks} blocks of {args.rounds} rounds:\n")
        print(identical_table(ddp, next(iter(cfgs.values())).log_every_steps))
        return
    rows = [
        [m, NPROC * cfg.data.batch_size, *comparison(ddp[m], cfg.log_every_steps)]
        for m, cfg in cfgs.items()
    ]
    print(
        f"DDP: {args.blocks} blocks of {args.rounds} rounds of {args.steps}-step segments, the "
        "same 2 processes:\n"
    )
    print(markdown_table(["model", "global batch", *COMPARISON], rows))
    print("\nScaling, samples/s (one process: the plain loop in this process; medians):\n")
    print(scaling(cfgs, ddp, min(args.rounds, 3), args.steps))
    print(f"\nLoad average at the end: {load_average()} (1, 5, 15 min)")


if __name__ == "__main__":
    main()
