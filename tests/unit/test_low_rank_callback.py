"""The `LowRank` callback in real fits: the plan against the spectrum of the weights at the start of
the fine-tune epochs, the rank held after every step, the factorized model and its exported file
against the trainer's projected dense model, a run stopped by a real signal inside the fine-tune
and resumed against an uninterrupted one (bit for bit), and bad input."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers import ENV, make_config
from trainer.build import build_trainer, check_callbacks_fit
from trainer.callbacks.base import Callback
from trainer.callbacks.low_rank import LowRank
from trainer.compress.lowrank import load_factorized
from trainer.compress.report import JSON_FILE
from trainer.distributed.parallelize import unwrap
from trainer.errors import ConfigError
from trainer.models import CNN
from trainer.state import TrainState

MODEL = {"_target_": "trainer.models.CNN", "channels": [4, 8], "hidden": 16}
SHAPE = [1, 16]
LOW_RANK = {
    "_target_": "trainer.callbacks.low_rank.LowRank",
    "energy": None,
    "ratio": 0.5,
    "finetune_epochs": 1,
    "latency_batches": [1, 8],
    "latency_repeats": 3,
    "latency_budget_s": 0.05,
    "compiled_latency": False,
}
PROBE = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(1))


def _trainer(run_dir: Path, extra: list[Callback] = (), before: list[Callback] = (), **kw: Any):
    low_rank = {**LOW_RANK, **kw.pop("low_rank", {})}
    cfg = make_config(
        model=MODEL,
        dataset={"input_shape": SHAPE},
        callbacks={"low_rank": low_rank},
        max_epochs=3,
        **kw,
    )
    trainer, _ = build_trainer(cfg, ENV, run_dir)
    trainer.callbacks[:0] = before
    trainer.callbacks.extend(extra)
    return trainer


def _weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    modules = dict(unwrap(model).named_modules())
    return {n: modules[n].weight.detach().flatten(1).clone() for n in names}


class Capture(Callback):
    """Before LowRank: the weights of every Linear/Conv at the start of step `at`."""

    def __init__(self, at: int) -> None:
        self.at, self.weights = at, {}

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.at:
            names = [n for n, m in unwrap(state.model).named_modules() if hasattr(m, "weight")]
            self.weights = _weights(state.model, names)


class RankProbe(Callback):
    """After LowRank: each planned weight's singular values beyond its rank, after every step."""

    def __init__(self, low_rank: LowRank) -> None:
        self.low_rank, self.tails = low_rank, {}

    def on_step_end(self, state: TrainState) -> None:
        tails = [0.0]
        for name, w in _weights(state.model, self.low_rank.plan).items():
            s = torch.linalg.svdvals(w.double())
            tails.append(float(s[self.low_rank.plan[name] :].max() / s[0]))
        if self.low_rank.plan:
            self.tails[state.step] = max(tails)


# ----------------------------------------------------------------------------------- one fit


def test_energy_plan_at_the_finetune_start_rank_held_and_factorized_model_exported(tmp_path):
    spe = 8  # 256 training samples / 32
    capture = Capture(at=2 * spe)
    trainer = _trainer(tmp_path, before=[capture], low_rank={"energy": 0.8, "ratio": None})
    (_, low_rank) = trainer.callbacks
    probe = RankProbe(low_rank)
    trainer.callbacks.append(probe)
    state = trainer.fit()

    # The plan: the smallest rank keeping 80% of each layer's energy at the start of epoch E - f,
    # where the factors pay; the weights were projected to that truncation there.
    assert state.metrics["low_rank/start_step"] == 2 * spe
    expected = {}
    for name, w in capture.weights.items():
        s = torch.linalg.svdvals(w.double())
        kept = s.square().cumsum(0) / s.square().sum()
        rank = int((kept < 0.8).sum()) + 1
        record = low_rank.layers[name]
        assert record["rank"] == rank and record["energy"] == pytest.approx(float(kept[rank - 1]))
        if rank * sum(w.shape) < w.numel():
            expected[name] = rank
    assert low_rank.plan == expected and expected
    # Held at rank r after every step of the fine-tune (the rest of the spectrum is round-off).
    assert sorted(probe.tails) == list(range(2 * spe + 1, 3 * spe + 1))
    assert max(probe.tails.values()) < 1e-5

    # The factorized model reproduces the trainer's projected dense model, and so does the
    # exported file loaded into a fresh CNN (weights only).
    dense = unwrap(trainer.model).eval()
    factorized = low_rank.factorized
    assert isinstance(factorized.classifier[1], nn.Sequential)
    fresh = CNN(input_shape=SHAPE, num_classes=4, channels=[4, 8], hidden=16)
    loaded = load_factorized(tmp_path / "factorized_model.pt", fresh).eval()
    with torch.no_grad():
        torch.testing.assert_close(factorized(PROBE), dense(PROBE), rtol=1e-4, atol=1e-5)
        assert torch.equal(loaded(PROBE), factorized(PROBE))
    saved = torch.load(tmp_path / "factorized_model.pt", weights_only=True)
    assert saved["plan"] == low_rank.plan

    # The rows: dense and factorized at the fine-tune start, fine-tuned at the end, with the
    # loop's own evaluation of the fine-tuned factorized model.
    rows = state.compression.rows
    assert [row["stage"] for row in rows] == ["dense", "factorized", "fine-tuned"]
    assert (tmp_path / JSON_FILE).is_file()
    metrics = trainer.measure(trainer.test_loader, "test", factorized)
    assert state.metrics["compression/fine-tuned/test_accuracy"] == metrics["test/accuracy"]
    params = sum(p.numel() for p in factorized.parameters())
    assert rows[2]["params"] == params < rows[0]["params"]
    assert rows[2]["flops_per_sample"] < rows[0]["flops_per_sample"]


def test_no_finetune_factorizes_at_fit_end_only(tmp_path):
    trainer = _trainer(tmp_path, low_rank={"finetune_epochs": 0})
    (low_rank,) = trainer.callbacks
    dense_before = {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()}
    planned_during_fit = []

    class Watch(Callback):
        def on_step_end(self, state: TrainState) -> None:
            planned_during_fit.append(bool(low_rank.plan))

    trainer.callbacks.append(Watch())
    state = trainer.fit()
    assert not any(planned_during_fit)
    assert [row["stage"] for row in state.compression.rows] == ["dense", "factorized"]
    # The trained weights, truncated at fit end: the trainer's model holds that truncation.
    trained = trainer.model.state_dict()
    assert not torch.equal(trained["classifier.1.weight"], dense_before["classifier.1.weight"])
    with torch.no_grad():
        torch.testing.assert_close(
            low_rank.factorized(PROBE), unwrap(trainer.model).eval()(PROBE), rtol=1e-4, atol=1e-5
        )


# ----------------------------------------------------------------------------------- resume


class SignalAt(Callback):
    """Send this process SIGUSR1 at the start of step `at` (a stop with a checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_run_stopped_inside_the_finetune_and_resumed_equals_an_uninterrupted_one(tmp_path):
    kw = {"optim": {"_target_": "torch.optim.AdamW", "lr": 1e-2}}
    straight = _trainer(tmp_path / "straight", **kw)
    straight_state = straight.fit()

    run = tmp_path / "resumed"
    checkpoint = {"every_steps": 100}
    first = _trainer(run, [SignalAt(2 * 8 + 3)], checkpoint=checkpoint, **kw)
    first_state = first.fit()
    assert first_state.interrupted and first_state.step == 2 * 8 + 4
    assert first.callbacks[0].plan and first.callbacks[0].factorized is None  # skipped
    assert not (run / "factorized_model.pt").exists()
    assert [row["stage"] for row in first_state.compression.rows] == ["dense", "factorized"]

    steps: list[int] = []

    class Steps(Callback):
        def on_step_start(self, state: TrainState) -> None:
            steps.append(state.step)

    resumed = _trainer(run, [Steps()], checkpoint=checkpoint, resume="auto", **kw)
    state = resumed.fit()
    assert steps[0] == 2 * 8 + 4  # it went on from the checkpoint, inside the fine-tune
    mine, theirs = resumed.callbacks[0], straight.callbacks[0]
    assert mine.plan == theirs.plan
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    for name, value in theirs.factorized.state_dict().items():
        assert torch.equal(mine.factorized.state_dict()[name], value), name
    for key in ("test_accuracy", "val_loss", "params", "size_bytes", "flops_per_sample"):
        for stage in ("dense", "factorized", "fine-tuned"):
            name = f"compression/{stage}/{key}"
            assert state.metrics[name] == straight_state.metrics[name], name


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"energy": 1.5, "ratio": None},
            r"callbacks\.low_rank\.energy: must be in \(0, 1\], got 1.5",
        ),
        ({"ratio": 0}, r"callbacks\.low_rank\.ratio: must be in \(0, 1\], got 0"),
        ({"energy": 0.9}, r"callbacks\.low_rank\.energy: give exactly one of low_rank\.energy or"),
        ({"ratio": None}, r"callbacks\.low_rank\.energy: give exactly one"),
        ({"finetune_epochs": -1}, r"callbacks\.low_rank\.finetune_epochs: must be >= 0"),
        ({"exclude": ["("]}, r"callbacks\.low_rank\.exclude: bad regex"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_key(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _trainer(tmp_path, low_rank=kwargs)
    assert not any(tmp_path.iterdir())


def test_nothing_to_factorize_is_refused_at_build_and_too_many_finetune_epochs_at_start(tmp_path):
    embedding = nn.Sequential(nn.Embedding(10, 4))
    cases = [
        (embedding, {"ratio": 0.5}, "Sequential: nothing to factorize: it has no Linear"),
        (nn.Sequential(nn.Linear(2, 2)), {"ratio": 1.0}, r"0: rank 2 does not pay"),
        (nn.Sequential(nn.Linear(8, 8)), {"ratio": 0.5, "exclude": ["0"]}, "excluded by '0'"),
    ]
    for model, kwargs, message in cases:
        callback = LowRank(**{"energy": None, **kwargs})
        with pytest.raises(ConfigError, match=r"^callbacks\.low_rank: .*" + message):
            check_callbacks_fit(model, [("callbacks.low_rank", callback)])
    check_callbacks_fit(nn.Sequential(nn.Linear(8, 8)), [("callbacks.low_rank", LowRank())])
    trainer = _trainer(tmp_path, low_rank={"finetune_epochs": 4})
    with pytest.raises(ValueError, match=r"low_rank\.finetune_epochs: 4 epochs of 8 steps exceed"):
        trainer.fit()
