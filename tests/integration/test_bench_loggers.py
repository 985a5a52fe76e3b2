"""The logger benchmark still runs: its `--quick` smoke version, two CLI runs and wandb alone,
prints a row per logger list and the wandb breakdown. No figure is asserted beyond being a real
number: timings belong in docs/loggers.md."""

from __future__ import annotations

import pytest
from test_benchmarks import RATIO, run_benchmark

pytestmark = pytest.mark.slow


def test_quick_logger_benchmark_prints_its_tables():
    out = run_benchmark(
        "bench_loggers", "--quick", "--jobs", "model=mlp", "--configs", "wandb", "--breakdown"
    )
    rows = [line for line in out.splitlines() if line.startswith("| model=mlp |")]
    assert [row.split("|")[2].strip() for row in rows] == ["logger=none", "logger=[wandb]"], out
    ratios = [float(x) for x in RATIO.findall(out)]
    assert ratios[0] == 1.0 and 0.01 < ratios[1] < 100, out
    breakdown = [line for line in out.splitlines() if line.startswith("| as in trainer/")]
    assert len(breakdown) == 1, out
    import_cell, init_cell = breakdown[0].split("|")[2:4]  # "s / CPU s", "s / CPU s / CPU s"
    assert float(import_cell.split("/")[0]) > 0 and float(init_cell.split("/")[0]) > 0, out
