"""Pruning sweep on MNIST-1D: test accuracy, model size and CPU latency of the MLP and the CNN at
several sparsities, one-shot without / with fine-tuning and gradual (docs/pruning.md).

    python benchmarks/pruning_sweep.py                      # about a minute on 2 CPU cores
    python benchmarks/pruning_sweep.py --base-epochs 4 --finetune-epochs 1 --sparsities 0.5

For each model the dense baseline trains once (`--base-epochs`), then every pruned variant starts
from a copy of its weights:

    one-shot      masks of the baseline applied, no training (what `Pruning` does on_fit_end)
    + fine-tune   `Pruning(finetune_epochs=F)` in an F-epoch fit: prune at step 0, masks held
    gradual       `Pruning(schedule="gradual")` in an F-epoch fit: cubic ramp from 0 to s_f over
                  the first F - G epochs (every 8 steps), then G epochs at s_f (G = `--gradual-ft`)
    0% + fine-tune is the control: the baseline trained F more epochs without pruning.

Everything runs through `trainer.build.build_trainer`, `Trainer.fit` and `Trainer.test`. Size is
the bytes of the nonzero weights in CSR (unstructured) or of the shrunk model (structured); latency
is the median forward time of a batch of 256 on one thread, of the dense model and of the pruned
one: unstructured pruning runs the same dense kernels (no gain); structured pruning is shrunk into
a smaller dense model first. Writes docs/pruning_accuracy.png; prints markdown tables to stdout,
then the command and the machine, torch and hooktrain commit it ran on (also in the figure's
footer), to paste beside the table.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trainer.build as build_module  # noqa: E402
from benchmarks.common import build_each_dataset_once, machine  # noqa: E402
from trainer.config import CheckpointConfig, DataConfig, TrainConfig  # noqa: E402
from trainer.distributed.env import DistEnv  # noqa: E402
from trainer.pruning import graph as G  # noqa: E402
from trainer.pruning import masks as M  # noqa: E402
from trainer.pruning.report import cpu_latency_ms, dense_bytes, sparse_bytes  # noqa: E402
from trainer.pruning.shrink import check_exact, parameter_count  # noqa: E402

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
MODELS = {  # the recipes' model/mlp.yaml and model/cnn.yaml
    "MLP": {"_target_": "trainer.models.MLP", "hidden": [256, 256], "dropout": 0.1},
    "CNN": {"_target_": "trainer.models.CNN", "channels": [32, 64], "hidden": 128, "dropout": 0.1},
}
METHODS = {  # label -> Pruning arguments
    "unstructured": {"method": "unstructured", "scope": "global"},
    "structured": {"method": "structured", "scope": "layer", "norm": 2},
}
DATASET = {"_target_": "trainer.data.datasets.mnist1d", "num_samples": 5000, "seed": 42}
LATENCY_BATCH = 256
LATENCY_ROUNDS, LATENCY_REPEATS = 5, 10  # 50 timed passes per model


# ---------------------------------------------------------------------------------- plumbing

build_each_dataset_once()


def config(
    model: str, epochs: int, lr: float, callbacks: dict[str, Any] | None = None
) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(dataset=dict(DATASET), batch_size=64, eval_batch_size=1000),
        model=dict(MODELS[model]),
        optim={"_target_": "torch.optim.AdamW", "lr": lr, "weight_decay": 0.01},
        schedule={
            "_target_": "trainer.callbacks.lr_schedule.WarmupCosine",
            "warmup_steps": 20 if callbacks is None else 0,
        },
        callbacks=callbacks or {},
        logger={},
        checkpoint=CheckpointConfig(save_final=False),
        device="cpu",
        max_epochs=epochs,
        grad_clip=1.0,
        test_after_fit=False,
    )


def fit(cfg: TrainConfig, run_dir: Path, start: dict[str, torch.Tensor] | None = None):
    trainer, _ = build_module.build_trainer(cfg, ENV, run_dir)
    if start is not None:
        trainer.model.load_state_dict(start)
    trainer.fit()
    return trainer


def test_accuracy(trainer: Any) -> float:
    return trainer.test()["test/accuracy"]


def masked(
    model: torch.nn.Module, method: str, sparsity: float
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """A copy of `model` pruned at once with the functions the callback uses, and (structured)
    the physically smaller model it deploys as."""
    model = copy.deepcopy(model)
    if method == "structured":
        example = torch.randn(2, *model.input_shape)
        last = [n for n, _ in M.prunable_layers(model)][-1]  # the output layer stays whole
        groups, _ = G.channel_groups(model, example, ignored=[last])
        removed = G.choose(groups, dict(model.named_parameters()), sparsity, norm=2)
        masks = G.group_masks(groups, removed, {n: p.shape for n, p in model.named_parameters()})
        return G.masked_copy(model, masks), check_exact(model, groups, removed, example)
    layers = M.prunable_layers(model)
    masks = M.unstructured_masks({n: m.weight for n, m in layers}, sparsity, scope="global")
    with torch.no_grad():
        for name, module in layers:
            module.weight.mul_(masks[name])
    return model, None


def paired_latency(models: list[torch.nn.Module], example: torch.Tensor) -> list[float]:
    """Median latency of each model over interleaved rounds, so that load on a shared machine
    weighs on all of them alike."""
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(LATENCY_ROUNDS):
        for i, model in enumerate(models):
            samples[i].append(cpu_latency_ms(model, example, repeats=LATENCY_REPEATS, warmup=2))
    return [statistics.median(s) for s in samples]


def size_and_latency(
    model: torch.nn.Module,
    shrunk: torch.nn.Module | None,
    dense: torch.nn.Module,
    method: str,
    example: torch.Tensor,
) -> dict[str, Any]:
    """Size and parameters of the pruned `model` as deployed, and latency of `dense` and of it."""
    model = copy.deepcopy(model).eval()
    state = model.state_dict()
    weights = [f"{n}.weight" for n, _ in M.prunable_layers(model)]
    if method == "structured":
        deployed = shrunk.eval()
        with torch.no_grad():
            assert torch.allclose(deployed(example), model(example), atol=1e-5)
        size, params = dense_bytes(deployed.state_dict()), parameter_count(deployed)
    else:  # the same dense model with zeros; stored as CSR
        deployed = model
        size = sparse_bytes(state, weights)
        params = sum(int(torch.count_nonzero(t)) for t in state.values())
    before, after = paired_latency([copy.deepcopy(dense).eval(), deployed], example)
    return {"bytes": size, "params_after": params, "latency_before": before, "latency_ms": after}


# ---------------------------------------------------------------------------------- the sweep


def sweep(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    ft, gradual_ft = args.finetune_epochs, args.gradual_ft
    for name in args.models:
        t = time.time()
        base = fit(config(name, args.base_epochs, 3e-3), run_dir)
        dense_acc = test_accuracy(base)
        start = copy.deepcopy(base.model.state_dict())
        example = torch.randn(
            LATENCY_BATCH, *base.model.input_shape, generator=torch.Generator().manual_seed(0)
        )
        dense_model = copy.deepcopy(base.model).eval()
        (dense_latency,) = paired_latency([dense_model], example)
        params = parameter_count(dense_model)
        control = test_accuracy(fit(config(name, ft, 1e-3), run_dir, start))
        rows = [{
            "method": "dense", "sparsity": 0.0, "oneshot": dense_acc, "finetune": control,
            "gradual": None, "params_after": params, "bytes": dense_bytes(start),
            "latency_before": dense_latency, "latency_ms": dense_latency,
        }]  # fmt: skip
        for method, kwargs in METHODS.items():
            for s in args.sparsities:
                pruned, shrunk = masked(base.model, method, s)
                base.model.load_state_dict(pruned.state_dict())
                oneshot = test_accuracy(base)
                base.model.load_state_dict(start)
                measured = size_and_latency(pruned, shrunk, dense_model, method, example)
                node = {"_target_": "trainer.callbacks.pruning.Pruning", "sparsity": s,
                        "latency_repeats": 0, "export": False, **kwargs}  # fmt: skip
                tuned = fit(
                    config(name, ft, 1e-3, {"p": {**node, "finetune_epochs": ft}}), run_dir, start
                )
                gradual_node = {**node, "schedule": "gradual", "every_steps": 8,
                                "finetune_epochs": gradual_ft}  # fmt: skip
                gradual = fit(config(name, ft, 1e-3, {"p": gradual_node}), run_dir, start)
                assert abs(gradual.callbacks[-1].sparsity - s) < 1e-12
                rows.append({
                    "method": method, "sparsity": s, "oneshot": oneshot,
                    "finetune": test_accuracy(tuned), "gradual": test_accuracy(gradual),
                    "params_after": measured["params_after"], "bytes": measured["bytes"],
                    "latency_before": measured["latency_before"],
                    "latency_ms": measured["latency_ms"],
                })  # fmt: skip
                print(f"  {name} {method} {s:.0%}: {rows[-1]}", file=sys.stderr)
        results[name] = {"rows": rows, "seconds": time.time() - t, "params": params}
        print(f"{name}: {time.time() - t:.0f} s", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------- outputs


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"| model | pruning | sparsity | one-shot | + fine-tune ({args.finetune_epochs} ep) "
        f"| gradual ({args.finetune_epochs} ep) | params after | size (KiB) "
        "| latency dense → pruned (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for name, result in results.items():
        for r in result["rows"]:
            lines.append(
                f"| {name} | {r['method']} | {r['sparsity']:.0%} | {fmt(r['oneshot'])} "
                f"| {fmt(r['finetune'])} | {fmt(r['gradual'])} | {r['params_after']:,} "
                f"| {r['bytes'] / 1024:.1f} | {r['latency_before']:.3f} → {r['latency_ms']:.3f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path, provenance: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    colors = {"unstructured": "tab:blue", "structured": "tab:orange"}
    styles = {"oneshot": ("--", "o", "one-shot"), "finetune": ("-", "s", "+ fine-tune"),
              "gradual": (":", "^", "gradual")}  # fmt: skip
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        dense = result["rows"][0]
        for method, color in colors.items():
            rows = [r for r in result["rows"] if r["method"] == method]
            xs = [0.0] + [r["sparsity"] for r in rows]
            for key, (line, marker, label) in styles.items():
                start = dense["finetune"] if key == "gradual" else dense[key]
                ys = [start] + [r[key] for r in rows]
                ax.plot(xs, ys, line, marker=marker, color=color, label=f"{method} {label}")
        ax.axhline(dense["oneshot"], color="gray", lw=0.8)
        ax.set_title(f"{name} on MNIST-1D ({result['params']:,} params)")
        ax.set_xlabel("sparsity (fraction of pruned weights / rows)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.text(0.005, 0.005, provenance, fontsize=5.5, color="gray", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    parser.add_argument("--base-epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--gradual-ft", type=int, default=2, help="gradual: epochs at s_f")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "pruning_accuracy.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = shlex.join(["python", "benchmarks/pruning_sweep.py", *sys.argv[1:]])
    ran_on = machine()  # before the sweep: its load average is the one the run started under
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = sweep(args, Path(tmp))
    plot(results, args.out, f"{command} on {ran_on}")
    print(table(results, args))
    print(
        f"\nMNIST-1D test set (1,000 signals); base training {args.base_epochs} epochs; "
        f"latency: batch {LATENCY_BATCH}, 1 thread, median of 50; {time.time() - started:.0f} s "
        f"in all; figure: {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}"
        f"\n`{command}` on {ran_on}."
    )


if __name__ == "__main__":
    main()
