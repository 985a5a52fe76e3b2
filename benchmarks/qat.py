"""Quantization-aware training against post-training quantization at the same bits, on MNIST-1D:
the CNN with static int8 (PT2E x86) and the MLP with dynamic int8 (torchao), for
docs/compression.md.

    python -m benchmarks.qat                                # about 10 minutes on 2 shared cores
    python -m benchmarks.qat --seeds 0 --epochs-scale 0.5  # one seed, half the epochs

For each workload and seed, two runs of the same recipe, seed and E epochs (the warmup-cosine
schedule over all E):
- PTQ: E float epochs, then the `Quantize` callback (`callbacks=[quantize]`);
- QAT: the same E epochs, the last f fake-quantized, then the same conversion
  (`callbacks=[qat]`); its report also holds the PTQ row of the model when the fake-quantized
  epochs began (epoch E - f, "PTQ@E-f").
The first E - f epochs of both runs are the same training. Accuracy is the report's (the int8
model as exported, run eagerly, on the test split); latency is not measured here
(`benchmarks.compression` does). Prints a table per workload with the mean and each seed's
value, the check "QAT int8 >= PTQ int8", then the command and the machine.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, markdown_table

# name -> (experiment preset, int8 mode, epochs E, fake-quantized epochs f)
WORKLOADS: dict[str, tuple[str, str, int, int]] = {
    "mnist1d_cnn": ("mnist1d_cnn", "static", 6, 1),
    "mnist1d_mlp": ("mnist1d_mlp", "dynamic", 10, 2),
}
# Accuracy only: each row's latency is timed as briefly as the report allows, eagerly.
QUIET = {"latency_batches": "[1]", "latency_repeats": 3, "latency_budget_s": 0.05}
QUIET |= {"compiled_latency": "false"}


def config(preset: str, callback: str, seed: int, epochs: int, args: dict[str, Any]) -> Any:
    from hydra import compose, initialize_config_dir

    from trainer.cli import recipes_dir  # also registers the schema and the resolvers
    from trainer.config import validate

    overrides = [f"experiment={preset}", f"callbacks=[{callback}]", "logger=none", "device=cpu"]
    overrides += [f"seed={seed}", f"max_epochs={epochs}", "checkpoint.save_final=false"]
    overrides += [f"callbacks.{callback}.{key}={value}" for key, value in {**QUIET, **args}.items()]
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        return validate(compose("train", overrides=overrides))


def fit(cfg: Any, run_dir: Path) -> dict[str, float]:
    """Test accuracy of each report row (by stage) after one fit."""
    from trainer.build import build_trainer
    from trainer.distributed.env import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    trainer, _ = build_trainer(cfg, env, run_dir)
    state = trainer.fit()
    return {row["stage"]: row["test_accuracy"] for row in state.compression.rows}


def run_workload(name: str, seeds: list[int], scale: float, tmp: Path) -> dict[str, Any]:
    preset, mode, epochs, finetune = WORKLOADS[name]
    epochs = max(2, round(epochs * scale))
    finetune = max(1, min(epochs - 1, round(finetune * scale)))
    columns: dict[str, list[float]] = {}
    started = time.time()
    for seed in seeds:
        ptq = fit(
            config(preset, "quantize", seed, epochs, {"mode": mode}), tmp / f"{name}_ptq{seed}"
        )
        qat = fit(
            config(preset, "qat", seed, epochs, {"mode": mode, "epochs": finetune}),
            tmp / f"{name}_qat{seed}",
        )
        for column, value in (
            ("fp32, E epochs", ptq["dense"]),
            ("PTQ int8, E epochs", ptq[f"quantized_{mode}"]),
            ("fp32 at E-f", qat["dense"]),
            ("PTQ int8 at E-f", qat[f"quantized_{mode}"]),
            ("QAT int8, E epochs", qat[f"qat_{mode}"]),
        ):
            columns.setdefault(column, []).append(value)
        print(f"  {name} seed {seed}: done at {time.time() - started:.0f} s", file=sys.stderr)
    return {"mode": mode, "epochs": epochs, "finetune": finetune, "columns": columns}


def table(name: str, result: dict[str, Any]) -> str:
    columns = result["columns"]
    rows = [
        [
            column,
            f"{100 * statistics.mean(values):.2f}",
            " / ".join(f"{100 * v:.1f}" for v in values),
        ]
        for column, values in columns.items()
    ]
    header = (
        f"**{name}** (int8 {result['mode']}, E = {result['epochs']} epochs, "
        f"f = {result['finetune']} fake-quantized)\n\n"
    )
    return header + markdown_table(["model", "test acc (mean %)", "per seed (%)"], rows)


def verdict(name: str, result: dict[str, Any]) -> str:
    columns = result["columns"]
    qat = statistics.mean(columns["QAT int8, E epochs"])
    ptq = statistics.mean(columns["PTQ int8, E epochs"])
    pairs = zip(columns["QAT int8, E epochs"], columns["PTQ int8, E epochs"], strict=True)
    wins = sum(q >= p for q, p in pairs)
    return (
        f"- {name}: QAT int8 - PTQ int8 = {100 * (qat - ptq):+.2f} pts (mean), QAT >= PTQ in "
        f"{wins} of {len(columns['QAT int8, E epochs'])} seeds: "
        + ("met" if qat >= ptq else "NOT met")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="x each workload's E, f")
    args = parser.parse_args()
    command = shlex.join(["python", "-m", "benchmarks.qat", *sys.argv[1:]])
    ran_on = machine()  # before the runs: the load they started under
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: run_workload(name, args.seeds, args.epochs_scale, Path(tmp))
            for name in args.workloads
        }
    for name, result in results.items():
        print(table(name, result) + "\n")
    print("Target: QAT int8 at least as accurate as PTQ int8 (same run length, seed, bits):")
    print("\n".join(verdict(name, result) for name, result in results.items()))
    print(f"\n{time.time() - started:.0f} s in all; `{command}` on {ran_on}.")


if __name__ == "__main__":
    main()
