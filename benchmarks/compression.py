"""Post-training int8 quantization on the reference models: the compression report's rows (dense,
then int8 static, dynamic and weight-only) on MNIST-1D (CNN, MLP, transformer, and a wide MLP whose
layers are large enough for int8 kernels to pay) and digits (CNN), for docs/compression.md.

    python -m benchmarks.compression                        # 3 to 9 minutes on 2 shared CPU cores
    python -m benchmarks.compression --workloads mnist1d_cnn --epochs-scale 0.25

Each workload trains once from its recipe (`hooktrain experiment=<preset>` with the epochs below,
no loggers), then each mode's `Quantize` callback runs its `on_fit_end` on the trained state, as
`callbacks=[...,quantize]` would: the rows land in one report per workload. A mode that fails
(torchao cannot quantize a layer, export fails) is recorded and the others go on. For int8
static, the test accuracy of the compiled model is measured too (the report's accuracy is the
exported graph's, run eagerly), since the targets are about the compiled model.

Prints one markdown table per workload and the targets' check, then the command and the
machine; writes docs/compression.png (test accuracy against artifact size and against latency).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine
from trainer.callbacks.quantize import Quantize

REPO = Path(__file__).resolve().parents[1]
MODES = ("static", "dynamic", "weight_only")
# name -> (hooktrain overrides, epochs)
WORKLOADS: dict[str, tuple[list[str], int]] = {
    "mnist1d_cnn": (["experiment=mnist1d_cnn"], 20),
    "mnist1d_mlp": (["experiment=mnist1d_mlp"], 30),
    "mnist1d_transformer": (["experiment=mnist1d_transformer"], 20),
    "mnist1d_mlp_wide": (["experiment=mnist1d_mlp", "model.hidden=[2048,2048]"], 10),
    "digits_cnn": (["experiment=digits_cnn"], 15),
}
LATENCY = {"latency_repeats": 30, "latency_budget_s": 4.0}  # a row's timed calls: ~4 s


def config(overrides: list[str], epochs: int) -> Any:
    from hydra import compose, initialize_config_dir

    from trainer.cli import recipes_dir  # also registers the schema and the resolvers
    from trainer.config import validate

    fixed = ["logger=none", "callbacks=[]", "device=cpu", "checkpoint.save_final=false"]
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *fixed, f"max_epochs={epochs}"])
    return validate(cfg)


def compiled_accuracy(model: torch.nn.Module, trainer: Any, batch: int = 256) -> float | str:
    """Test accuracy of `model` under `torch.compile` (freezing, else without), in batches of
    `batch` (the last one padded: one compiled shape)."""
    import torch._inductor.config as inductor_config

    data = trainer.test_loader.dataset
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.stack([data[i][1] for i in range(len(data))])
    pad = -len(x) % batch
    padded = torch.cat([x, x[:pad]])
    why = ""
    for freezing in (True, False):
        try:
            with inductor_config.patch(freezing=freezing), torch.no_grad():
                compiled = torch.compile(model, dynamic=False)
                logits = torch.cat([compiled(part) for part in padded.split(batch)])[: len(x)]
            return (logits.argmax(-1) == y).double().mean().item()
        except Exception as err:  # recorded, like the report's compiled latency
            why = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return f"failed ({why})"


def run_workload(name: str, epochs: int, run_dir: Path) -> dict[str, Any]:
    from trainer.build import build_trainer
    from trainer.distributed.env import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    overrides, _ = WORKLOADS[name]
    trainer, _ = build_trainer(config(overrides, epochs), env, run_dir)
    started = time.time()
    state = trainer.fit()
    trained = time.time() - started
    failures, compiled = {}, None
    for mode in MODES:
        callback = Quantize(
            mode=mode, artifact=f"quantized_{mode}.pt", run_dir=str(run_dir), **LATENCY
        )
        try:
            callback.check_model(trainer.model)
            callback.on_fit_end(state)
        except Exception as err:  # torchao or export refusing this model: recorded
            failures[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            continue
        if mode == "static":
            compiled = compiled_accuracy(callback.quantized, trainer)
        print(f"  {name} {mode}: done at {time.time() - started:.0f} s", file=sys.stderr)
    return {
        "rows": state.compression.rows,
        "failures": failures,
        "static_compiled_accuracy": compiled,
        "epochs": epochs,
        "train_seconds": trained,
        "seconds": time.time() - started,
    }


# ---------------------------------------------------------------------------------- outputs


def _ms(row: dict[str, Any], mode: str, batch: int) -> str:
    value = row.get(f"latency_{mode}_b{batch}_ms")
    return "—" if value is None else f"{value:.3f}"


def table(name: str, result: dict[str, Any]) -> str:
    rows = result["rows"]
    dense = rows[0]
    lines = [
        f"**{name}** ({result['epochs']} epochs, trained in {result['train_seconds']:.0f} s)",
        "",
        "| stage | test acc | Δ pts | params | nonzeros | size (kB) | × smaller | FLOPs/sample "
        "| eager b1 / b256 (ms) | compiled b1 / b256 (ms) | b256 compiled × faster "
        "| peak MB eager / compiled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        fast = row.get("latency_compiled_b256_ms")
        base = dense.get("latency_compiled_b256_ms")
        speed = f"{base / fast:.2f}" if fast and base else "—"
        peaks = [row.get(f"peak_memory_{m}_bytes") for m in ("eager", "compiled")]
        lines.append(
            f"| {row['stage']} | {100 * row['test_accuracy']:.1f} "
            f"| {100 * (row['test_accuracy'] - dense['test_accuracy']):+.1f} "
            f"| {row['params']:,} | {row['nonzeros']:,} | {row['size_bytes'] / 1e3:.1f} "
            f"| {dense['size_bytes'] / row['size_bytes']:.2f} | {row['flops_per_sample']:,} "
            f"| {_ms(row, 'eager', 1)} / {_ms(row, 'eager', 256)} "
            f"| {_ms(row, 'compiled', 1)} / {_ms(row, 'compiled', 256)} | {speed} "
            f"| {' / '.join('—' if p is None else f'{p / 1e6:.2f}' for p in peaks)} |"
        )
    notes = [f"- {row['stage']}: compiled {row['compiled']}" for row in rows]
    notes += [f"- {mode}: not quantized ({why})" for mode, why in result["failures"].items()]
    return "\n".join(lines + [""] + notes)


def targets(name: str, result: dict[str, Any]) -> str:
    dense = result["rows"][0]
    static = next((r for r in result["rows"] if r["stage"] == "quantized_static"), None)
    if static is None:
        return f"- {name}: no int8 static row ({result['failures'].get('static')})"
    accuracy = result["static_compiled_accuracy"]
    change = (
        f"{100 * (accuracy - dense['test_accuracy']):+.2f} pts"
        if isinstance(accuracy, float)
        else accuracy
    )
    fast, base = static.get("latency_compiled_b256_ms"), dense.get("latency_compiled_b256_ms")
    speed = f"{base / fast:.2f}x" if fast and base else "not measured"
    size = dense["size_bytes"] / static["size_bytes"]
    return (
        f"- {name}: test accuracy of int8 static compiled - fp32 {change} (target: within "
        "0.5), artifact "
        f"{size:.2f}x smaller (>= 3.5), batch-256 latency {speed} lower than fp32 compiled (>= 1.5)"
    )


def plot(results: dict[str, dict[str, Any]], path: Path, provenance: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    size_axes, latency_axes = figure.subplots(1, 2, sharey=True)
    markers = {"dense": "o", "quantized_static": "s", "quantized_dynamic": "^"}
    markers["quantized_weight_only"] = "v"
    for colour, (name, result) in enumerate(results.items()):
        for row in result["rows"]:
            style = {"color": f"C{colour}", "marker": markers.get(row["stage"], "x")}
            accuracy = 100 * row["test_accuracy"]
            size_axes.scatter(row["size_bytes"] / 1e3, accuracy, **style)
            latency = row.get("latency_compiled_b256_ms") or row.get("latency_eager_b256_ms")
            latency_axes.scatter(latency, accuracy, **style)
        size_axes.plot([], [], color=f"C{colour}", label=name)
    for stage, marker in markers.items():
        latency_axes.scatter([], [], marker=marker, color="gray", label=stage)
    size_axes.set(xscale="log", xlabel="artifact size on disk (kB)", ylabel="test accuracy (%)")
    latency_axes.set(xscale="log", xlabel="CPU latency, batch 256, 1 thread, compiled (ms)")
    size_axes.legend(fontsize="small")
    latency_axes.legend(fontsize="small")
    figure.text(0.005, 0.0, provenance, fontsize=5.5, color="gray")
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="x each workload's epochs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "compression.png")
    args = parser.parse_args()
    command = shlex.join(["python", "-m", "benchmarks.compression", *sys.argv[1:]])
    ran_on = machine()  # before the runs: the load they started under
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            epochs = max(1, round(WORKLOADS[name][1] * args.epochs_scale))
            results[name] = run_workload(name, epochs, Path(tmp) / name)
            print(f"{name}: {results[name]['seconds']:.0f} s", file=sys.stderr)
    plot(results, args.out, f"{command} on {ran_on}")
    for name, result in results.items():
        print(table(name, result) + "\n")
    print("Targets (int8 static, compiled, against fp32 compiled):")
    print("\n".join(targets(name, result) for name, result in results.items()))
    print(f"\n{time.time() - started:.0f} s in all; `{command}` on {ran_on}.")


if __name__ == "__main__":
    main()
