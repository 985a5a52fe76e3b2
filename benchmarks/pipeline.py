"""The whole compression pipeline on the MNIST-1D CNN, through the real `hooktrain` command, against
the dense CNN: is the final int8 artifact at least 10x smaller, within 1 point of test accuracy?

    python -m benchmarks.pipeline                    # ~10 minutes on 2 shared CPU cores
    python -m benchmarks.pipeline --max-epochs 16 --no-compiled-latency    # ~4 minutes

Three runs, each `hooktrain ... logger=none` in a folder of its own:

1. dense: `experiment=mnist1d_cnn` (the reference model and its test accuracy);
2. pipeline: `experiment=mnist1d_cnn_compress` (train, gradual pruning to 80%, fine-tune, static
   int8, report), from scratch;
3. compress_only: `'experiment=[mnist1d_cnn,compress_only]' init_from=<the dense run>` (one-shot
   pruning to 80% of the dense weights, 3 fine-tune epochs, static int8, report).

The dense model's size is its state dict as `torch.save` writes it (what the report's
`size_bytes` counts for a stage without an artifact) and that file compressed with xz. Each
run's int8 row is judged by its shipped file, the xz-compressed artifact
(`quantized_model.pt.xz`, `size_compressed_bytes`): int8 stores the zeros densely, so the plain
artifact (`size_bytes`) holds one byte per pruned weight. Both ratios are printed, and the one
against the dense model's xz-compressed file too, so that the gain of compressing alone shows.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BENCH_ENV, REPO, machine
from trainer.compress.report import xz_compressed

TARGET_RATIO, TARGET_POINTS = 10.0, 1.0


def hooktrain(args: list[str], cwd: Path) -> float:
    """Run `python -m trainer *args` in `cwd`; returns its wall time. A failure ends the benchmark
    with the command's own output."""
    env = {**os.environ, **BENCH_ENV, "PYTHONPATH": str(REPO)}
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"hooktrain {shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.time() - started


def dense_reference(run: Path) -> dict[str, Any]:
    """The dense run's test accuracy and its weights' sizes, plain and xz-compressed."""
    weights = torch.load(run / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    data = buffer.getvalue()
    summary = json.loads((run / "summary.json").read_text())
    return {
        "stage": "dense (experiment=mnist1d_cnn)",
        "test_accuracy": summary["test/accuracy"],
        "params": summary["parameters"],
        "nonzeros": sum(int(torch.count_nonzero(t)) for t in weights.values()),
        "size_bytes": len(data),
        "size_compressed_bytes": len(xz_compressed(data)),
    }


def table(name: str, rows: list[dict[str, Any]], dense: dict[str, Any], seconds: float) -> str:
    lines = [
        f"**{name}** (run in {seconds:.0f} s)",
        "",
        "| stage | test acc | Δ pts vs dense | params | nonzeros | size (kB) | xz (kB) "
        "| dense size / xz | b256 eager / compiled (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        latency = [row.get(f"latency_{mode}_b256_ms") for mode in ("eager", "compiled")]
        lines.append(
            f"| {row['stage']} | {100 * row['test_accuracy']:.1f} "
            f"| {100 * (row['test_accuracy'] - dense['test_accuracy']):+.1f} "
            f"| {row['params']:,} | {row['nonzeros']:,} | {row['size_bytes'] / 1e3:.1f} "
            f"| {row['size_compressed_bytes'] / 1e3:.1f} "
            f"| {dense['size_bytes'] / row['size_compressed_bytes']:.2f} "
            f"| {' / '.join('—' if v is None else f'{v:.3f}' for v in latency)} |"
        )
    return "\n".join(lines)


def verdict(name: str, final: dict[str, Any], dense: dict[str, Any]) -> str:
    points = 100 * (final["test_accuracy"] - dense["test_accuracy"])
    shipped = dense["size_bytes"] / final["size_compressed_bytes"]
    plain = dense["size_bytes"] / final["size_bytes"]
    both_xz = dense["size_compressed_bytes"] / final["size_compressed_bytes"]
    met = shipped >= TARGET_RATIO and points >= -TARGET_POINTS
    return (
        f"- {name}: {final['stage']} {points:+.2f} pts against dense (target: within "
        f"{TARGET_POINTS:g}); its xz artifact {shipped:.2f}x smaller than the dense weights "
        f"(target: >= {TARGET_RATIO:g}x; the plain int8 artifact {plain:.2f}x; against the dense "
        f"weights xz-compressed too {both_xz:.2f}x): {'MET' if met else 'NOT MET'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-epochs", type=int, default=None, help="dense and pipeline runs")
    parser.add_argument("--no-compiled-latency", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args()
    command = shlex.join(["python", "-m", "benchmarks.pipeline", *sys.argv[1:]])
    ran_on = machine()
    common = ["logger=none", "device=cpu"]
    if args.no_compiled_latency:
        common.append("callbacks.quantize.compiled_latency=false")
    epochs = [] if args.max_epochs is None else [f"max_epochs={args.max_epochs}"]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        runs = {
            "dense": ["experiment=mnist1d_cnn", *epochs, "logger=none", "device=cpu"],
            "pipeline": ["experiment=mnist1d_cnn_compress", *epochs, *common],
            "compress_only": [
                "experiment=[mnist1d_cnn,compress_only]",
                f"init_from={root / 'dense'}",
                *common,
            ],
        }
        seconds = {}
        for name, overrides in runs.items():
            seconds[name] = hooktrain([*overrides, f"hydra.run.dir={root / name}"], root)
            print(f"{name}: {seconds[name]:.0f} s", file=sys.stderr)
        dense = dense_reference(root / "dense")
        reports = {
            name: json.loads((root / name / "compression_report.json").read_text())["rows"]
            for name in ("pipeline", "compress_only")
        }
    print(table("dense", [dense], dense, seconds["dense"]) + "\n")
    for name, rows in reports.items():
        print(table(f"{name}: {shlex.join(runs[name][:1])}", rows, dense, seconds[name]) + "\n")
    print(
        "Target: the whole pipeline (80% sparsity, then int8) at least 10x smaller, within 1 point:"
    )
    for name, rows in reports.items():
        print(verdict(name, rows[-1], dense))
    print(f"\n{time.time() - started:.0f} s in all; `{command}` on {ran_on}.")


if __name__ == "__main__":
    main()
