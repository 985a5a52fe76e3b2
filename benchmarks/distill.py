"""Knowledge distillation on MNIST-1D: a student of half the teacher's width, distilled from the
teacher against the same student trained alone (docs/compression.md).

    python -m benchmarks.distill                              # CNN and MLP, 3 seeds
    python -m benchmarks.distill --models cnn --seeds 0 --epochs 5    # a smoke run

For each model and seed the teacher (the recipes' model/cnn.yaml or model/mlp.yaml) trains
`--epochs` epochs and saves its final checkpoint; then the half-width student (every width
halved) trains as many epochs twice, from the same initial weights and in the same data order:
alone (cross-entropy) and distilled from that teacher (`Distillation`, `--alpha`, `--temperature`).
Everything runs through `trainer.build.build_trainer`, `Trainer.fit` and `Trainer.test`. Prints a
markdown table of test accuracy per seed and the mean over seeds, then the command and the
machine, torch and hooktrain commit it ran on.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import trainer.build as build_module  # noqa: E402
from benchmarks.common import build_each_dataset_once, machine  # noqa: E402
from trainer.config import CheckpointConfig, DataConfig, TrainConfig  # noqa: E402
from trainer.distributed.env import DistEnv  # noqa: E402

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TEACHERS = {  # the recipes' model/cnn.yaml and model/mlp.yaml
    "cnn": {"_target_": "trainer.models.CNN", "channels": [32, 64], "hidden": 128, "dropout": 0.1},
    "mlp": {"_target_": "trainer.models.MLP", "hidden": [256, 256], "dropout": 0.1},
}
STUDENTS = {  # every width halved
    "cnn": {**TEACHERS["cnn"], "channels": [16, 32], "hidden": 64},
    "mlp": {**TEACHERS["mlp"], "hidden": [128, 128]},
}
DATASET = {"_target_": "trainer.data.datasets.mnist1d", "num_samples": 5000, "seed": 42}

build_each_dataset_once()


def config(model: dict[str, Any], seed: int, epochs: int, **fields: Any) -> TrainConfig:
    """The run of `model`; `fields` set or override TrainConfig fields (loss, checkpoint, ...)."""
    defaults: dict[str, Any] = {
        "data": DataConfig(dataset=dict(DATASET), batch_size=64, eval_batch_size=1000),
        "optim": {"_target_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"_target_": "trainer.callbacks.lr_schedule.WarmupCosine", "warmup_steps": 20},
        "callbacks": {},
        "logger": {},
        "device": "cpu",
        "grad_clip": 1.0,
        "val_every_epochs": 0,
        "test_after_fit": False,
    }
    return TrainConfig(**{**defaults, **fields}, model=dict(model), seed=seed, max_epochs=epochs)


def fit_and_test(cfg: TrainConfig, run_dir: Path) -> tuple[float, int]:
    """Fit `cfg` in `run_dir`; its test accuracy and the model's parameter count."""
    trainer, facts = build_module.build_trainer(cfg, ENV, run_dir)
    trainer.fit()
    return trainer.test()["test/accuracy"], facts["parameters"]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in args.models:
        rows = []
        for seed in args.seeds:
            started = time.time()
            teacher_dir = work / f"{name}-teacher-{seed}"
            save = CheckpointConfig(save_final=True)
            teacher_cfg = config(TEACHERS[name], seed, args.epochs, checkpoint=save)
            teacher, teacher_params = fit_and_test(teacher_cfg, teacher_dir)
            no_save = CheckpointConfig(save_final=False)
            alone_cfg = config(STUDENTS[name], seed, args.epochs, checkpoint=no_save)
            alone, student_params = fit_and_test(alone_cfg, work / f"{name}-alone-{seed}")
            loss = {
                "_target_": "trainer.compress.distill.Distillation",
                "_recursive_": False,
                "teacher": str(teacher_dir),
                "teacher_model": TEACHERS[name],
                "alpha": args.alpha,
                "temperature": args.temperature,
            }
            distilled_cfg = config(STUDENTS[name], seed, args.epochs, checkpoint=no_save, loss=loss)
            distilled, _ = fit_and_test(distilled_cfg, work / f"{name}-distilled-{seed}")
            rows.append({"seed": seed, "teacher": teacher, "alone": alone, "distilled": distilled})
            print(
                f"{name} seed {seed}: teacher {teacher:.4f}, alone {alone:.4f}, distilled "
                f"{distilled:.4f} ({time.time() - started:.0f} s)",
                file=sys.stderr,
            )
        results[name] = {"rows": rows, "params": (teacher_params, student_params)}
    return results


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Test accuracy on MNIST-1D, {args.epochs} epochs each; the student has every width "
        f"halved; distillation alpha={args.alpha}, T={args.temperature}.",
        "",
        "| model | params teacher / student | seed | teacher | student alone | student "
        "distilled | distilled - alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        params = "{:,} / {:,}".format(*result["params"])
        rows = result["rows"]
        for row in rows:
            gain = row["distilled"] - row["alone"]
            lines.append(
                f"| {name} | {params} | {row['seed']} | {row['teacher']:.4f} | "
                f"{row['alone']:.4f} | {row['distilled']:.4f} | {gain:+.4f} |"
            )
        mean = {k: statistics.mean(r[k] for r in rows) for k in ("teacher", "alone", "distilled")}
        spread = {
            k: statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0
            for k in ("alone", "distilled")
        }
        lines.append(
            f"| **{name}** | {params} | mean of {len(rows)} | {mean['teacher']:.4f} | "
            f"{mean['alone']:.4f} ± {spread['alone']:.4f} | "
            f"{mean['distilled']:.4f} ± {spread['distilled']:.4f} | "
            f"**{mean['distilled'] - mean['alone']:+.4f}** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(TEACHERS), default=["cnn", "mlp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.5)  # recipes/loss/distill.yaml
    parser.add_argument("--temperature", type=float, default=1.0)  # recipes/loss/distill.yaml
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        results = run(args, Path(work))
    print(table(results, args))
    print()
    command = shlex.join(["python", "-m", "benchmarks.distill", *sys.argv[1:]])
    print(f"Command: `{command}`")
    print(f"Machine: {machine()}")


if __name__ == "__main__":
    main()
