"""`hooktrain evaluate` on a run the real command trained: the weights file every fit writes
reproduces the run's own test metrics, and a folder with nothing to evaluate is one line."""

from __future__ import annotations

import json

import torch

from tests.conftest import run_cli
from trainer.models import MLP


def test_a_fit_leaves_weights_that_evaluate_to_its_own_test_metrics(tmp_path):
    run_dir = tmp_path / "run"
    args = ["model=mlp", "max_epochs=1", "logger=none", f"hydra.run.dir={run_dir}"]
    trained = run_cli(args, tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())

    saved = torch.load(run_dir / "model.pt", weights_only=True)
    model = MLP(input_shape=saved["input_shape"], num_classes=saved["num_classes"])
    model.load_state_dict(saved["state_dict"])  # the plain class, no hooktrain needed

    evaluated = run_cli(["evaluate", str(run_dir), "--split", "test"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((run_dir / "eval_test.json").read_text())
    assert {k: metrics[k] for k in ("test/loss", "test/accuracy")} == {
        k: summary[k] for k in ("test/loss", "test/accuracy")
    }
    assert metrics["weights"] == str(run_dir / "model.pt")

    before = sorted(p.name for p in tmp_path.iterdir())
    nothing = run_cli(["evaluate", str(tmp_path / "nowhere")], tmp_path)
    assert nothing.returncode == 3
    assert nothing.stderr.strip().splitlines() == [
        f"hooktrain: checkpoint error: {tmp_path / 'nowhere'}: no such run folder, checkpoint "
        "or weights file"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
