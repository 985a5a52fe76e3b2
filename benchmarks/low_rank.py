"""Low-rank factorization at half the FLOPs on MNIST-1D (CNN, MLP): the compression report's rows
(dense, factorized, fine-tuned) and the two ways of holding the rank while fine-tuning, for
docs/compression.md.

    python -m benchmarks.low_rank          # 15 minutes on 2 shared CPU cores at load 3-4
    python -m benchmarks.low_rank --workloads mnist1d_cnn --epochs-scale 0.5

For each workload, the ratio is the largest of a grid whose factorization (`factorize`) of the
model gives at most half its FLOPs per sample (by ratio the ranks depend on the shapes alone).
Three fits of the recipe (`hooktrain experiment=<preset>`, no loggers), each E epochs:

- `dense`: no fine-tune; the `LowRank` callback factorizes at fit end (f = 0): its rows are the
  dense model of E epochs, the baseline, and its factorization without fine-tuning;
- `fixed`: `LowRank(finetune_epochs=f)`, the weights held at rank r by the subspaces of the
  phase start, W <- U_r U_r^T W V_r V_r^T (what the callback does);
- `svd`: the same, but each step's projection is the rank-r truncation of the current W by a
  fresh SVD (the alternative the callback does not take: it costs an SVD per layer per step and,
  across ranks, a broadcast, as SVD is not bitwise repeatable across thread counts).

Prints one table per workload (test accuracy and the change from the E-epoch dense model, params,
FLOPs, size, eager latency) and the target's check (half the FLOPs within 1 point after
fine-tune), then the command and the machine. Three seeds by default (`--seeds`): one fit's
accuracy on MNIST-1D's 1,000 test signals has a standard error of about 1 point.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine
from benchmarks.compression import config
from trainer.callbacks.low_rank import LowRank
from trainer.compress.lowrank import factorize

# name -> (hooktrain overrides, epochs E, fine-tune epochs f, layers left alone). The first layer
# (its 1 or 40 inputs) and the 10-class output layer are left alone: by ratio they would get rank
# 1 and 3, which alone took both models to about chance level (15% and 22%) in a first run, for
# under 3% of the FLOPs. f = E / 2: the warmup-cosine schedule leaves little learning rate to the
# last epochs.
WORKLOADS: dict[str, tuple[list[str], int, int, list[str]]] = {
    "mnist1d_cnn": (["experiment=mnist1d_cnn"], 20, 10, [r"features\.0$", r"classifier\.4$"]),
    "mnist1d_mlp": (["experiment=mnist1d_mlp"], 30, 15, [r"net\.1$", r"net\.7$"]),
}
RATIOS = [r / 100 for r in range(60, 4, -1)]  # 0.60, 0.59, ..., 0.05
TIMING = {"latency_batches": [1, 256], "latency_repeats": 20, "latency_budget_s": 2.0}


class SVDEachStep(LowRank):
    """The comparison: after every step, W <- its rank-r truncation by a fresh SVD (one process)."""

    @torch.no_grad()
    def project(self) -> None:
        for name in self._local:
            weight = self._weights[name]
            u, s, vh = torch.linalg.svd(weight.flatten(1).float(), full_matrices=False)
            rank = self.plan[name]
            weight.copy_(((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(weight.shape))


def half_flops_ratio(
    model: torch.nn.Module, example: torch.Tensor, exclude: list[str]
) -> tuple[float, float]:
    """The largest ratio of the grid whose factorization has at most half the FLOPs, and the
    FLOPs fraction it gives."""
    for ratio in RATIOS:
        try:
            report = factorize(copy.deepcopy(model), example=example, ratio=ratio, exclude=exclude)
        except ValueError:  # nothing pays at this ratio
            continue
        fraction = report["flops"]["after"] / report["flops"]["before"]
        if fraction <= 0.5:
            return ratio, fraction
    raise ValueError("no ratio of the grid halves the FLOPs")


def fit(
    name: str, kind: str, ratio: float, seed: int, run_dir: Path
) -> tuple[dict[str, Any], float]:
    from trainer.build import build_trainer
    from trainer.distributed.env import DistEnv

    overrides, epochs, finetune, exclude = WORKLOADS[name]
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    trainer, _ = build_trainer(config([*overrides, f"seed={seed}"], epochs), env, run_dir)
    cls = SVDEachStep if kind == "svd" else LowRank
    callback = cls(
        energy=None,
        ratio=ratio,
        finetune_epochs=0 if kind == "dense" else finetune,
        exclude=exclude,
        compiled_latency=False,
        run_dir=str(run_dir),
        **TIMING,
    )
    trainer.callbacks.append(callback)
    started = time.time()
    state = trainer.fit()
    return {row["stage"]: row for row in state.compression.rows}, time.time() - started


def run_workload(name: str, scale: float, seeds: int, run_dir: Path) -> dict[str, Any]:
    overrides, epochs, finetune, exclude = WORKLOADS[name]
    epochs, finetune = max(2, round(epochs * scale)), max(1, round(finetune * scale))
    WORKLOADS[name] = (overrides, epochs, finetune, exclude)
    from trainer.build import build_data, build_model

    cfg = config(overrides, epochs)
    splits = build_data(cfg)
    example = torch.stack([splits.train[0][0]])
    ratio, fraction = half_flops_ratio(build_model(cfg, splits), example, exclude)
    result: dict[str, Any] = {"epochs": epochs, "finetune": finetune, "ratio": ratio}
    result["flops_fraction"] = fraction
    for kind in ("dense", "fixed", "svd"):
        runs = [fit(name, kind, ratio, seed, run_dir / f"{kind}{seed}") for seed in range(seeds)]
        print(f"  {name} {kind}: {[round(s) for _, s in runs]} s", file=sys.stderr)
        result[kind] = [rows for rows, _ in runs]
        result[f"{kind}_seconds"] = statistics.mean(s for _, s in runs)
    return result


# ---------------------------------------------------------------------------------- outputs


def accuracy(result: dict[str, Any], kind: str, stage: str) -> list[float]:
    """Test accuracy of `stage` in each seed's `kind` fit, in percent."""
    return [100 * rows[stage]["test_accuracy"] for rows in result[kind]]


def _mean_sd(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread}"


def table(name: str, result: dict[str, Any]) -> str:
    e, f = result["epochs"], result["finetune"]
    rows = [
        (f"dense, {e} epochs", "dense", "dense"),
        ("factorized at the end, no fine-tune", "dense", "factorized"),
        (f"dense after {e - f} epochs", "fixed", "dense"),
        (f"factorized after {e - f} epochs", "fixed", "factorized"),
        (f"fine-tuned {f} epochs, fixed subspaces", "fixed", "fine-tuned"),
        (f"fine-tuned {f} epochs, SVD each step", "svd", "fine-tuned"),
    ]
    baseline = accuracy(result, "dense", "dense")
    lines = [
        f"**{name}** (ratio {result['ratio']}: {100 * result['flops_fraction']:.0f}% of the "
        f"FLOPs; fits of {result['dense_seconds']:.0f} / {result['fixed_seconds']:.0f} / "
        f"{result['svd_seconds']:.0f} s: dense / fixed / SVD each step)",
        "",
        f"| stage | test acc (mean ± sd of {len(baseline)} seeds) | Δ pts vs dense | params "
        "| FLOPs/sample | size (kB) | eager b1 / b256 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, kind, stage in rows:
        row, accs = result[kind][0][stage], accuracy(result, kind, stage)
        change = statistics.mean(a - b for a, b in zip(accs, baseline, strict=True))
        lines.append(
            f"| {label} | {_mean_sd(accs)} | {change:+.1f} "
            f"| {row['params']:,} | {row['flops_per_sample']:,} | {row['size_bytes'] / 1e3:.1f} "
            f"| {row['latency_eager_b1_ms']:.3f} / {row['latency_eager_b256_ms']:.3f} |"
        )
    return "\n".join(lines)


def target(name: str, result: dict[str, Any]) -> str:
    baseline = statistics.mean(accuracy(result, "dense", "dense"))
    fixed, svd = (statistics.mean(accuracy(result, k, "fine-tuned")) for k in ("fixed", "svd"))
    return (
        f"- {name}: {100 * result['flops_fraction']:.0f}% of the FLOPs, fine-tuned (fixed "
        f"subspaces) {fixed - baseline:+.1f} pts vs dense (target: within 1); SVD each "
        f"step {svd - baseline:+.1f} pts"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="x each workload's epochs")
    parser.add_argument("--seeds", type=int, default=3, help="fits of each kind, seeds 0, 1, ...")
    args = parser.parse_args()
    command = shlex.join(["python", "-m", "benchmarks.low_rank", *sys.argv[1:]])
    ran_on = machine()  # before the runs: the load they started under
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            results[name] = run_workload(name, args.epochs_scale, args.seeds, Path(tmp) / name)
    for name, result in results.items():
        print(table(name, result) + "\n")
    print("Target (half the FLOPs, within 1 point of dense after fine-tune):")
    print("\n".join(target(name, result) for name, result in results.items()))
    print(f"\n{time.time() - started:.0f} s in all; `{command}` on {ran_on}.")


if __name__ == "__main__":
    main()
