"""`hooktrain evaluate | predict | export` from the outside: one run the real command trained
(its best checkpoint by val/loss is not its last), checked against references computed here from
the files alone (model.pt read weights-only into the model class, the checkpoint read with DCP);
the same run as 2 FSDP2 ranks; and bad input to the same entry point: one line, exit 2 or 3,
nothing written. The training runs and one `evaluate` are subprocesses of the real command; the
other commands go through its entry point (`trainer.cli.main`) in this process, to save imports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from conftest import run_cli
from omegaconf import OmegaConf

from trainer import cli
from trainer.data.datasets import synthetic
from trainer.models import MLP

pytestmark = [
    pytest.mark.slow,
    # torchrun's error recorder (trainer.cli.main) finds no real stderr under capsys
    pytest.mark.filterwarnings("ignore:Unable to enable fault handler"),
    # the test reads a checkpoint with DCP in this one process
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

# 3 steps an epoch, a checkpoint each epoch; at this rate val/loss is lowest at step 12 of 15.
# No dropout: 2 ranks draw other masks than one process would.
TRAIN = [
    "data=synthetic",
    "data.dataset.num_samples=512",
    "model=mlp",
    "model.dropout=0",
    "optim.lr=0.03",
    "max_epochs=5",
    "logger=none",
    "callbacks=[]",
    "checkpoint.every_steps=3",
    "checkpoint.best_monitor=val/loss",
    "checkpoint.best_mode=min",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("export_cli")
    trained = run_cli([*TRAIN, "hydra.run.dir=run"], cwd)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return cwd / "run"


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _model_of(weights: dict) -> MLP:
    """The model class alone, built from the weights file's own record, with its weights."""
    arguments = {k: v for k, v in weights["model"].items() if k != "_target_"}
    model = MLP(input_shape=weights["input_shape"], num_classes=weights["num_classes"], **arguments)
    model.load_state_dict(weights["state_dict"])
    return model.eval()


def _splits(run: Path):
    """The run's data, built here from its config.yaml's dataset node."""
    node = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").data.dataset)
    return synthetic(**{k: v for k, v in node.items() if k != "_target_"})


def _scores(model: MLP, split) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Logits, targets, mean cross-entropy and accuracy of `model` over a whole split."""
    x, y = split.tensors
    with torch.no_grad():
        logits = model(x)
    loss = F.cross_entropy(logits.double(), y).item()
    return logits, y, loss, (logits.argmax(-1) == y).double().mean().item()


def _hooktrain(argv: list[str], capsys, monkeypatch) -> tuple[int, list[str], str]:
    """`hooktrain *argv` through the command's own entry point, in this process: its exit code
    (0 when it returned), its stderr lines and its stdout."""
    monkeypatch.setattr("sys.argv", ["hooktrain", *argv])
    capsys.readouterr()
    code = 0
    try:
        cli.main()
    except SystemExit as ended:
        code = ended.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def test_evaluate_predict_and_the_weights_file_agree_with_the_run(run: Path, capsys, monkeypatch):
    summary = _summary(run)
    model = _model_of(torch.load(run / "model.pt", weights_only=True))
    logits, targets, loss, accuracy = _scores(model, _splits(run).test)
    assert loss == pytest.approx(summary["test/loss"], rel=1e-6)
    assert accuracy == summary["test/accuracy"]

    evaluated = run_cli(["evaluate", str(run), "--split", "test"], run.parent)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    printed = json.loads(evaluated.stdout.strip().splitlines()[-1])
    saved = json.loads((run / "eval_test.json").read_text())
    for metrics in (printed, saved):
        assert {k: metrics[k] for k in ("test/loss", "test/accuracy")} == {
            k: summary[k] for k in ("test/loss", "test/accuracy")
        }
    assert saved["weights"] == str(run / "model.pt")

    out = run.parent / "predictions.pt"
    argv = ["predict", str(run), "--split", "test", "--out", str(out)]
    code, errors, _ = _hooktrain(argv, capsys, monkeypatch)
    assert code == 0, errors
    result = torch.load(out, weights_only=True)
    assert torch.equal(result["predictions"], logits.argmax(-1))
    assert torch.equal(result["targets"], targets)
    torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-6)


def test_export_best_gives_the_best_checkpoints_weights_and_score(run: Path, capsys, monkeypatch):
    summary = _summary(run)
    best = Path(summary["best_checkpoint"])
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert best != newest  # the best is not simply the final weights
    recorded = json.loads((best / "manifest.json").read_text())["monitor"]["val/loss"]

    code, errors, _ = _hooktrain(["export", str(run), "--best"], capsys, monkeypatch)
    assert code == 0, errors
    weights = torch.load(run / "best_model.pt", weights_only=True)

    # The checkpoint's model weights, read with DCP itself into tensors of a fresh model's names
    # and shapes.
    stored = {"model": {k: torch.zeros_like(v) for k, v in _model_of(weights).state_dict().items()}}
    dcp.load(stored, checkpoint_id=str(best))
    assert weights["state_dict"].keys() == stored["model"].keys()
    for name, tensor in stored["model"].items():
        assert torch.equal(weights["state_dict"][name], tensor), name

    val = _splits(run).val
    assert _scores(_model_of(weights), val)[2] == pytest.approx(recorded, rel=1e-6)
    final = _model_of(torch.load(run / "model.pt", weights_only=True))
    assert _scores(final, val)[2] != pytest.approx(recorded, rel=1e-6)


@pytest.mark.distributed
def test_two_fsdp2_ranks_write_the_weights_of_one_process(run: Path, capsys, monkeypatch):
    """The same run as 2 FSDP2 ranks (hooktrain launching them, gloo), each with half the batch:
    its model.pt holds the full, gathered weights, which match the one-process run's to float
    rounding (2 half-batch gradients averaged across ranks round otherwise than one batch's
    mean, so not bit for bit) and score its test accuracy; `evaluate` reads it in one process."""
    two = run.parent / "fsdp"
    trained = run_cli(
        [*TRAIN, "parallel=fsdp", "parallel.nproc_per_node=2", "data.batch_size=64",
         f"hydra.run.dir={two}"],
        run.parent,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert _summary(two)["world_size"] == 2
    # one folder, one set of files: a log per rank as under torchrun, no rank's files but shards
    assert {p.name for p in two.iterdir()} == {
        ".hydra", "checkpoints", "config.yaml", "hooktrain.lock", "hooktrain_rank0.log",
        "hooktrain_rank1.log", "model.pt", "summary.json",
    }  # fmt: skip
    # The launched ranks log like the launching process (they lost every INFO line before):
    # rank 0 prints the resolved config, once.
    assert trained.stdout.count("[INFO] - config (also in") == 1
    assert "[INFO] - config (also in" in (two / "hooktrain_rank0.log").read_text()
    sharded = torch.load(two / "model.pt", weights_only=True)
    single = torch.load(run / "model.pt", weights_only=True)
    assert sharded["state_dict"].keys() == single["state_dict"].keys()
    for name, tensor in single["state_dict"].items():
        torch.testing.assert_close(sharded["state_dict"][name], tensor, rtol=0, atol=1e-4)
    _, _, loss, accuracy = _scores(_model_of(sharded), _splits(run).test)
    assert accuracy == _summary(run)["test/accuracy"]
    assert loss == pytest.approx(_summary(run)["test/loss"], rel=1e-4)

    code, errors, out = _hooktrain(["evaluate", str(two)], capsys, monkeypatch)
    assert code == 0, errors
    evaluated = json.loads(out.strip().splitlines()[-1])
    assert evaluated["test/accuracy"] == _summary(two)["test/accuracy"]
    # the ranks' batches were other slices of the split: float32 logits round a little otherwise
    assert evaluated["test/loss"] == pytest.approx(_summary(two)["test/loss"], rel=1e-6)


# ------------------------------------------------------------------------------ bad input


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture
def copied_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("eval_*", "best_*"))
    return tmp_path / "run"


def test_a_folder_without_weights_or_a_damaged_model_pt_is_one_line(
    copied_run: Path, tmp_path: Path, capsys, monkeypatch
):
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = copied_run / "model.pt"
    truncated.write_bytes(truncated.read_bytes()[:200])
    junk = copied_run / "junk.pt"  # beside the run's config.yaml
    junk.write_text("not torch\n")
    nowhere = tmp_path / "nowhere"
    cases = [
        (["evaluate", str(nowhere)], f"{nowhere}: no such run folder, checkpoint or weights file"),
        (["evaluate", str(empty)], f"{empty}: holds no model.pt and no complete checkpoint"),
        (["predict", str(empty), "--out", str(tmp_path / "p.pt")], f"{empty}: holds no model.pt"),
        (["evaluate", str(copied_run)], f"{truncated}: not a weights file hooktrain can read"),
        (
            ["predict", str(copied_run), "--out", str(tmp_path / "p.pt")],
            f"{truncated}: not a weights file hooktrain can read",
        ),
        (["evaluate", str(junk)], f"{junk}: not a weights file hooktrain can read (not a file"),
    ]
    before = _files(tmp_path)
    for argv, start in cases:
        code, lines, _ = _hooktrain(argv, capsys, monkeypatch)
        assert code == 3, (argv, lines)
        assert len(lines) == 1 and lines[0].startswith(f"hooktrain: checkpoint error: {start}"), (
            argv,
            lines,
        )
        assert "\x1b" not in lines[0] and len(lines[0]) < 300, lines[0]
    assert _files(tmp_path) == before


def test_a_split_or_inputs_the_run_cannot_take_are_one_line_and_exit_2(
    copied_run: Path, tmp_path: Path, capsys, monkeypatch
):
    from torch.utils.data import TensorDataset

    files = {
        "shape": torch.randn(5, 3),  # the run's inputs have 64 features
        "dtype": torch.zeros(5, 64, dtype=torch.int64),
        "pairs": [(torch.randn(64), 1), (torch.randn(64), 0)],  # (input, target) items
        "dataset": TensorDataset(torch.randn(4, 64), torch.zeros(4)),  # an object, not data
    }
    for name, value in files.items():
        torch.save(value, tmp_path / f"{name}.pt")
    out = str(tmp_path / "p.pt")
    cases = [
        (["evaluate", str(copied_run), "--split", "train"], "--split: "),
        (["predict", str(copied_run), "--split", "train", "--out", out], "--split: "),
        (
            ["predict", str(copied_run), "--data", str(tmp_path / "shape.pt"), "--out", out],
            "--data: ",
        ),
        (
            ["predict", str(copied_run), "--data", str(tmp_path / "dtype.pt"), "--out", out],
            "--data: ",
        ),
        (
            ["predict", str(copied_run), "--data", str(tmp_path / "pairs.pt"), "--out", out],
            "--data: ",
        ),
        (
            ["predict", str(copied_run), "--data", str(tmp_path / "dataset.pt"), "--out", out],
            "--data: ",
        ),
    ]
    before = _files(tmp_path)
    for argv, start in cases:
        code, lines, _ = _hooktrain(argv, capsys, monkeypatch)
        assert code == 2, (argv, lines)
        assert len(lines) == 1 and lines[0].startswith(f"hooktrain: config error: {start}"), (
            argv,
            lines,
        )
        assert "\x1b" not in lines[0] and len(lines[0]) < 300, lines[0]
    assert _files(tmp_path) == before
