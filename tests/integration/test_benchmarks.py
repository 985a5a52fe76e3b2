"""The benchmark scripts still run: their `--quick` smoke versions, end to end, print full tables.

No figure is asserted beyond being a real number: timings belong in docs/benchmarks.md.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, cli_env

pytestmark = pytest.mark.slow

RATIO = re.compile(r"\*\*(\d+\.\d+)x\*\*")


def run_benchmark(script: str, *args: str) -> str:
    """`python -m benchmarks.<script> <args>` from the repository root; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *args],
        cwd=REPO_ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(
    ("script", "args", "rows"),
    [
        ("bench_loop", ["--models", "mlp"], ["| mlp | 256 |", "Fresh processes"]),
        ("bench_ddp", [], ["| mlp | 512 |", "Scaling"]),
        (
            "bench_loop",
            ["--models", "cnn", "--override", "data.batched_fetch=false"],
            ["overrides: data.batched_fetch=false", "| cnn | 32 |"],
        ),
        ("bench_ddp", ["--identical"], ["Plain DDP loop against itself", "| mlp | "]),
    ],
)
def test_quick_benchmark_prints_its_tables(script, args, rows):
    out = run_benchmark(script, "--quick", *args)
    for row in rows:
        assert row in out, out
    ratios = [float(x) for x in RATIO.findall(out)]
    assert ratios and all(0.1 < r < 10 for r in ratios), out


def test_the_gpu_benchmark_harness_runs_on_cpu():
    """bench_gpu's real target is a CUDA machine; on CPU its harness (the CLI runs, one under
    torchrun, and the table read from their summary.json) still runs end to end."""
    out = run_benchmark("bench_gpu", "--device", "cpu", "--quick")
    rows = [line for line in out.splitlines() if line.startswith("| fp32 |")]
    assert len(rows) == 1 and "| DDP x1 | 1 |" in out, out
    tokens_per_second = float(rows[0].split("|")[4].replace(",", ""))
    assert tokens_per_second > 0 and rows[0].split("|")[6].strip() == "-"  # no MFU on CPU
