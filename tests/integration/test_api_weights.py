"""The weights files of a fit from Python (`trainer.api.fit` with the user's own model and data
objects, which config.yaml cannot rebuild): early stopping's best weights, the final weights,
and evaluate / export / predict handed the same objects again. The fit runs as a notebook runs
it: a command line of the kernel's own, in a worker thread, and leaves the working folder, the
command line and the signal handlers as they were."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trainer import commands
from trainer.api import fit
from trainer.config import ConfigError
from trainer.stop_signals import STOP_SIGNALS

# lr high enough that val/loss rises again before the budget: the best is not the last epoch
QUICK = [
    "logger=[jsonl]",
    "schedule=constant",
    "max_epochs=6",
    "data.batch_size=16",
    "optim.lr=0.05",
    "callbacks=[early_stopping]",
    "callbacks.early_stopping.patience=10",
    "callbacks.early_stopping.restore_best_weights=true",
    "callbacks.early_stopping.verbose=false",
]


def blobs(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    return TensorDataset(torch.randn(n, 6, generator=gen) + y[:, None], y)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))


DATA = (blobs(160, 0), blobs(48, 1), blobs(48, 2))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, nn.Module, dict]:
    run_dir = tmp_path_factory.mktemp("api") / "run"
    model, returned = net(), []
    kernel_argv = ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", list(kernel_argv))
        before = os.getcwd(), {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        worker = threading.Thread(
            target=lambda: returned.append(
                fit(model=model, data=DATA, overrides=QUICK, run_dir=run_dir)
            )
        )
        worker.start()
        worker.join(timeout=120)
        assert returned, "fit in a worker thread did not return"
        assert (os.getcwd(), {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}) == before
        assert sys.argv == kernel_argv
    return run_dir, model, returned[0]


def test_restore_best_weights_writes_best_model_pt_for_objects_handed_to_fit(fitted):
    run_dir, model, summary = fitted
    saved = torch.load(run_dir / "best_model.pt", weights_only=True)
    assert saved["model"] == {
        "_target_": "trainer.api.given",
        "type": "torch.nn.modules.container.Sequential",
    }
    assert (saved["input_shape"], saved["num_classes"]) == ([6], None)
    fresh = net()
    fresh.load_state_dict(saved["state_dict"])  # the user's class alone
    for name, tensor in model.state_dict().items():  # `model` holds the restored best weights
        assert torch.equal(saved["state_dict"][name], tensor), name

    # Evaluated by hand, the file scores what the run's test after the fit reported.
    x, y = DATA[2].tensors
    with torch.no_grad():
        accuracy = (fresh(x).argmax(-1) == y).double().mean().item()
    assert accuracy == summary["test/accuracy"]


def test_evaluate_export_and_predict_take_the_objects_again(fitted, tmp_path):
    run_dir, _, summary = fitted
    with pytest.raises(ConfigError, match=r"^model: .*config.yaml records a torch.nn.modules"):
        commands.evaluate(run_dir / "best_model.pt", out=tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()

    metrics = commands.evaluate(run_dir / "best_model.pt", model=net(), splits=DATA)
    assert metrics == {k: summary[k] for k in ("test/loss", "test/accuracy")}

    # the final checkpoint holds the last weights, which early stopping replaced by the best
    last = commands.export(run_dir, out=run_dir / "last.pt", model=net(), splits=DATA)
    exported = torch.load(last, weights_only=True)
    assert exported["model"] == torch.load(run_dir / "best_model.pt", weights_only=True)["model"]
    final = exported["state_dict"]
    best = torch.load(run_dir / "best_model.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(final[k], best[k]) for k in best)

    predicted = commands.predict(last, tmp_path / "p.pt", model=net(), splits=DATA)
    reference = net()
    reference.load_state_dict(final)
    with torch.no_grad():
        assert torch.equal(predicted["predictions"], reference(DATA[2].tensors[0]).argmax(-1))


def test_a_fit_from_python_writes_model_pt(fitted):
    run_dir, model, _ = fitted
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved["state_dict"][name], tensor), name
