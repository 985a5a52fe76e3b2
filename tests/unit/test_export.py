"""The plain weights file and evaluate / predict / export from Python, on a run fitted here."""

from __future__ import annotations

import json

import torch

from tests.export_runs import fitted_run
from tests.helpers import SGD, assert_same_weights
from trainer import commands, export
from trainer.callbacks.early_stopping import EarlyStopping
from trainer.models import MLP


def _weights(path):
    return torch.load(path, weights_only=True)


def test_final_weights_reload_and_reproduce_the_test_accuracy(tmp_path):
    trainer = fitted_run(tmp_path)
    reference = trainer.test()  # what the run's summary reports

    saved = _weights(tmp_path / "model.pt")
    fresh = MLP(
        input_shape=tuple(saved["input_shape"]), num_classes=saved["num_classes"], hidden=[16]
    )
    fresh.load_state_dict(saved["state_dict"])  # the model class alone, no hooktrain
    assert_same_weights(fresh, trainer.model)
    assert_same_weights(export.load_model(tmp_path), trainer.model)

    # By hand over the test split: the same accuracy from the reloaded weights.
    fresh.eval()
    with torch.no_grad():
        correct = sum((fresh(x).argmax(-1) == y).sum().item() for x, y in trainer.test_loader)
    assert correct / len(trainer.test_loader.dataset) == reference["test/accuracy"]

    assert commands.evaluate(tmp_path) == reference  # model.pt
    written = json.loads((tmp_path / "eval_test.json").read_text())
    assert written["test/accuracy"] == reference["test/accuracy"]
    assert not (tmp_path / "summary.json").exists()


def test_checkpoint_evaluate_export_and_predict_match_the_live_model(tmp_path):
    trainer = fitted_run(tmp_path)
    val, test = trainer.validate(), trainer.test()
    step = tmp_path / "checkpoints" / f"step_{trainer.state.step:08d}"

    assert commands.evaluate(step, split="val") == val  # through the verified reader
    out = commands.export(tmp_path, best=True, out=tmp_path / "best.pt")
    assert commands.evaluate(out) == test
    exported = _weights(out)["state_dict"]
    assert exported.keys() == trainer.model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in trainer.model.state_dict().items())

    predicted = commands.predict(tmp_path, tmp_path / "p.pt", split="test")
    assert _weights(tmp_path / "p.pt").keys() == predicted.keys()
    assert torch.equal(predicted["predictions"], predicted["logits"].argmax(-1))
    accuracy = (predicted["predictions"] == predicted["targets"]).double().mean().item()
    assert accuracy == test["test/accuracy"]

    inputs = torch.stack([trainer.test_loader.dataset[i][0] for i in range(5)])
    torch.save(inputs, tmp_path / "inputs.pt")
    given = commands.predict(tmp_path, tmp_path / "q.pt", data=tmp_path / "inputs.pt")
    assert torch.equal(given["logits"], predicted["logits"][:5])


def test_restore_best_weights_writes_best_model(tmp_path):
    stopping = EarlyStopping(
        monitor="val/loss", patience=1, restore_best_weights=True, run_dir=str(tmp_path)
    )
    trainer = fitted_run(tmp_path, callbacks=(stopping,), max_epochs=4, optim={**SGD, "lr": 0.5})
    best = _weights(tmp_path / "best_model.pt")
    assert best["model"]["_target_"] == "trainer.models.MLP"
    live = trainer.model.state_dict()  # the restored best weights
    assert all(torch.equal(best["state_dict"][k], v) for k, v in live.items())
    assert all(torch.equal(stopping.best_weights[k], v) for k, v in live.items())
