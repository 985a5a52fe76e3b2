"""A real `hooktrain -m` sweep in which one job fails: the others finish, the sweep exits with the
number of failed jobs, and its root holds the table of every job."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

pytestmark = pytest.mark.slow

LRS = ["1e-3", "-1", "3e-3"]  # the second is refused by validation: a config error


def test_a_sweep_with_one_failing_job_finishes_the_others_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    args = ["-m", f"optim.lr={','.join(LRS)}", "model=mlp", "max_steps=5", "data=synthetic"]
    args += ["data.dataset.num_samples=512", "logger=[tensorboard]", f"hydra.sweep.dir={out}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-4000:]  # one job failed
    assert "optim.lr: must be > 0, got -1" in proc.stderr
    assert "hooktrain sweep" in proc.stderr  # the printed table

    with (out / "sweep_summary.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [float(row["optim.lr"]) for row in rows] == [float(lr) for lr in LRS]
    jobs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(jobs) == 2  # the refused job left no folder
    for row, job in zip([rows[0], rows[2]], jobs, strict=True):
        summary = json.loads((job / "summary.json").read_text())
        assert row["status"] == "ok"
        assert int(row["steps"]) == summary["steps"] == 5
        for key in ("test/accuracy", "test/loss", "val/loss", "train/loss"):
            assert float(row[key]) == pytest.approx(summary[key], rel=1e-3)
        # TensorBoard's HParams tab: the job's overrides beside its final metrics
        events = EventAccumulator(str(job / "tensorboard"))
        events.Reload()
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        )
        assert float(start.session_start_info.hparams["optim.lr"].string_value) == float(
            row["optim.lr"]
        )
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        tags = {info.name.tag for info in experiment.experiment.metric_infos}
        assert {"summary/test/accuracy", "summary/val/loss"} <= tags
        assert events.Scalars("summary/test/accuracy")[-1].value == pytest.approx(
            summary["test/accuracy"]
        )
    assert rows[1]["status"].startswith("failed:")
    assert "optim.lr: must be > 0" in rows[1]["status"]
    assert rows[1]["test/accuracy"] == ""
    markdown = (out / "sweep_summary.md").read_text()
    assert markdown.count("| ok |") == 2 and "| failed: " in markdown


def test_an_optuna_sweep_minimizes_val_loss(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = tmp_path / "out"
    args = ["-m", "hydra/sweeper=minimize_val_loss", "hydra.sweeper.n_trials=3"]
    args += ["optim.lr=interval(1e-4,1e-2)", "model=mlp", "max_steps=5", "data=synthetic"]
    args += ["data.dataset.num_samples=512", "logger=none", f"hydra.sweep.dir={out}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with (out / "sweep_summary.csv").open() as table:
        losses = [float(row["val/loss"]) for row in csv.DictReader(table)]
    assert len(losses) == 3
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    # Optuna minimized what the jobs returned; the table keeps 4 significant digits
    assert best["best_value"] == pytest.approx(min(losses), rel=1e-3)
