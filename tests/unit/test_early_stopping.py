"""`EarlyStopping` driven through its hooks with hand-made metric sequences, then in real fits.

Each sequence test states where the stop must happen from the documented rules (Lightning's):
an improvement beats the best by MORE than min_delta, the first check sets the best, patience
stops when wait_count >= patience, thresholds are strict, non-finite values stop at once.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.callbacks.early_stopping import EarlyStopping
from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig
from trainer.distributed.env import DistEnv
from trainer.state import TrainState

NAN, INF = math.nan, math.inf


def make_state(rank: int = 0) -> TrainState:
    model = nn.Linear(3, 2)
    return TrainState(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_steps=1000,
        steps_per_epoch=10,
        rank=rank,
        world_size=2 if rank else 1,
    )


def drive(
    es: EarlyStopping,
    values: list[float],
    state: TrainState | None = None,
    key: str = "val/loss",
    on_check: Any = None,
) -> tuple[int | None, TrainState]:
    """Feed `values` as successive validations (10 steps apart, like the loop: log, then
    on_eval_end, then flush); return the index of the check that asked to stop, or None."""
    state = state or make_state()
    if not es._fitting:
        es.on_fit_start(state)
    for i, value in enumerate(values):
        state.step += 10
        if on_check is not None:
            on_check(state, i)
        state.log({key: value})
        es.on_eval_end(state)
        state.unlogged.clear()
        if state.should_stop:
            return i, state
    return None, state


# ----------------------------------------------------------------------------- mode & patience


def test_mode_min_stops_after_patience_checks_without_improvement():
    es = EarlyStopping(patience=3)
    stop, state = drive(es, [1.0, 0.9, 0.95, 0.96, 0.97, 0.1])
    assert stop == 4  # 0.95, 0.96, 0.97: three checks without improvement on best 0.9
    assert es.best == pytest.approx(0.9)
    assert es.wait_count == 3
    assert es.stopped_step == state.step == 50
    assert "patience=3" in state.stop_reason and "val/loss" in state.stop_reason


def test_mode_max_tracks_the_highest_value():
    es = EarlyStopping(monitor="val/accuracy", mode="max", patience=2)
    stop, _ = drive(es, [0.5, 0.6, 0.55, 0.7, 0.6, 0.69, 0.9], key="val/accuracy")
    assert stop == 5
    assert es.best == pytest.approx(0.7)
    # The same sequence in mode min: 0.5 is the best from the start, so 0.6 and 0.55 stop it.
    es_min = EarlyStopping(monitor="val/accuracy", mode="min", patience=2)
    assert drive(es_min, [0.5, 0.6, 0.55, 0.7], key="val/accuracy")[0] == 2


@pytest.mark.parametrize(("patience", "expected"), [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_patience_counts_consecutive_checks_without_improvement(patience, expected):
    es = EarlyStopping(patience=patience)
    # The first check sets the best and never stops, even with patience=0.
    stop, _ = drive(es, [1.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert stop == expected


def test_an_improvement_resets_the_wait_count():
    es = EarlyStopping(patience=3)
    stop, _ = drive(es, [1.0, 2.0, 2.0, 0.5, 2.0, 2.0, 2.0, 2.0])
    assert stop == 6


def test_the_first_check_sets_the_best_whatever_its_value():
    es = EarlyStopping(patience=0, min_delta=100.0)
    stop, _ = drive(es, [1e9])
    assert stop is None
    assert es.best == 1e9 and es.wait_count == 0


# ----------------------------------------------------------------------------- min_delta


@pytest.mark.parametrize(
    ("mode", "values", "stops"),
    [
        ("min", [1.0, 0.75], True),  # better by exactly min_delta: no improvement
        ("min", [1.0, 0.74], False),  # better by more: an improvement
        ("min", [1.0, 0.9], True),
        ("max", [1.0, 1.25], True),
        ("max", [1.0, 1.26], False),
    ],
)
def test_an_improvement_of_exactly_min_delta_does_not_count(mode, values, stops):
    es = EarlyStopping(mode=mode, min_delta=0.25, patience=1)
    stop, _ = drive(es, values)
    assert (stop == 1) is stops
    assert es.best == (values[0] if stops else values[1])


def test_min_delta_zero_needs_a_strictly_better_value():
    es = EarlyStopping(patience=1)
    assert drive(es, [1.0, 1.0])[0] == 1
    es = EarlyStopping(patience=1)
    assert drive(es, [1.0, 0.999999])[0] is None


# ----------------------------------------------------------------------------- thresholds


def test_stopping_threshold_stops_once_strictly_better():
    es = EarlyStopping(patience=10, stopping_threshold=0.5)
    stop, state = drive(es, [1.0, 0.7, 0.5, 0.49, 0.1])
    assert stop == 3  # 0.5 equals the threshold: not better than it
    assert "stopping_threshold" in state.stop_reason
    assert es.best == pytest.approx(0.49)  # the stopping value is also the new best
    es = EarlyStopping(mode="max", monitor="acc", patience=10, stopping_threshold=0.9)
    assert drive(es, [0.5, 0.9, 0.95], key="acc")[0] == 2


def test_stopping_threshold_on_the_first_check():
    es = EarlyStopping(stopping_threshold=2.0)
    assert drive(es, [1.0])[0] == 0


def test_divergence_threshold_stops_once_strictly_worse():
    es = EarlyStopping(patience=10, divergence_threshold=2.0)
    stop, state = drive(es, [1.0, 1.5, 2.0, 2.01, 0.1])
    assert stop == 3
    assert "divergence_threshold" in state.stop_reason and "diverged" in state.stop_reason
    assert es.best == pytest.approx(1.0)
    es = EarlyStopping(mode="max", monitor="acc", patience=10, divergence_threshold=0.2)
    assert drive(es, [0.5, 0.2, 0.19], key="acc")[0] == 2


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_check_finite_stops_at_once_on_nan_or_inf(bad):
    es = EarlyStopping(patience=10)
    stop, state = drive(es, [1.0, 0.9, bad, 0.1])
    assert stop == 2
    assert "not finite" in state.stop_reason
    assert es.best == pytest.approx(0.9)  # a non-finite value never becomes the best


def test_check_finite_off_counts_nan_as_no_improvement():
    es = EarlyStopping(patience=3, check_finite=False)
    stop, _ = drive(es, [1.0, NAN, NAN, 0.5, NAN, INF])
    assert stop is None
    assert es.best == 0.5 and es.wait_count == 2
    es = EarlyStopping(patience=3, check_finite=False)
    assert drive(es, [1.0, NAN, INF, NAN])[0] == 3  # by patience


def test_check_finite_off_a_leading_nan_does_not_become_the_best():
    es = EarlyStopping(patience=5, check_finite=False)
    stop, _ = drive(es, [NAN, 2.0, 1.5])
    assert stop is None
    assert es.best == 1.5 and es.wait_count == 0


def test_check_finite_off_inf_still_trips_the_divergence_threshold():
    es = EarlyStopping(check_finite=False, divergence_threshold=10.0)
    stop, state = drive(es, [1.0, INF])
    assert stop == 1 and "divergence_threshold" in state.stop_reason


# ----------------------------------------------------------------------------- errors


def test_missing_key_raises_naming_the_key_and_the_available_keys():
    es = EarlyStopping(monitor="val/los")
    state = make_state()
    es.on_fit_start(state)
    state.log({"val/loss": 1.0, "val/accuracy": 0.5})
    with pytest.raises(RuntimeError, match="'val/los'") as info:
        es.on_eval_end(state)
    assert "val/accuracy, val/loss" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"monitor": ""}, "monitor"),
        ({"mode": "minimum"}, "mode"),
        ({"patience": -1}, "patience"),
        ({"patience": 1.5}, "patience"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"min_delta": NAN}, "min_delta"),
        ({"stopping_threshold": INF}, "stopping_threshold"),
        ({"divergence_threshold": "high"}, "divergence_threshold"),
        ({"stopping_threshold": 2.0, "divergence_threshold": 1.0}, "divergence_threshold"),
        (
            {"mode": "max", "stopping_threshold": 1.0, "divergence_threshold": 2.0},
            "divergence_threshold",
        ),
        ({"check_on": "epoch"}, "check_on"),
        ({"check_finite": 1}, "check_finite"),
        ({"restore_best_weights": "yes"}, "restore_best_weights"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        EarlyStopping(**kwargs)


# ----------------------------------------------------------------------------- reporting


def test_stop_is_logged_kept_in_the_state_and_printed_on_rank_zero(caplog):
    caplog.set_level(logging.INFO, logger="hooktrain.early_stopping")
    es = EarlyStopping(patience=1)
    stop, state = drive(es, [1.0, 1.0])
    assert stop == 1
    assert state.should_stop
    assert state.stop_reason.startswith("early stopping at step 20:")
    assert state.metrics["early_stopping/stopped_step"] == 20
    assert state.metrics is not state.unlogged  # logged through state.log
    assert any(state.stop_reason in r.getMessage() for r in caplog.records)

    caplog.clear()
    es = EarlyStopping(patience=1)
    stop, state = drive(es, [1.0, 1.0], state=make_state(rank=1))
    assert stop == 1 and state.stop_reason.startswith("early stopping")
    assert not caplog.records  # other ranks stay silent


def test_an_earlier_reason_is_kept():
    state = make_state()
    state.request_stop("another rank requested a stop")
    es = EarlyStopping(patience=0)
    es.on_fit_start(state)
    for v in (1.0, 2.0):
        state.log({"val/loss": v})
        es.on_eval_end(state)
    assert state.stop_reason == "another rank requested a stop"
    assert es.stopped_step == 0


def test_evaluations_after_the_fit_are_not_checked():
    es = EarlyStopping(patience=0)
    stop, state = drive(es, [1.0])
    es.on_fit_end(state)
    state.log({"test/loss": 5.0})  # trainer.test() after fit: on_eval_end with stale val/loss
    es.on_eval_end(state)
    assert not state.should_stop and es.checks == 1


# ----------------------------------------------------------------------------- check_on=step


def test_check_on_step_checks_only_fresh_values():
    es = EarlyStopping(monitor="train/loss", check_on="step", patience=2)
    state = make_state()
    es.on_fit_start(state)
    es.on_eval_end(state)  # eval hooks are ignored in step mode (no key needed there)
    losses = {2: 1.0, 4: 1.5, 6: 1.6}
    stopped_at = None
    for step in range(1, 8):
        state.step = step
        if step in losses:
            state.log({"train/loss": losses[step], "lr": 0.1})
        es.on_step_end(state)
        state.unlogged.clear()  # the loop's flush on log steps
        if state.should_stop:
            stopped_at = step
            break
    assert es.checks == 3
    assert stopped_at == 6 and es.stopped_step == 6


def test_check_on_step_raises_on_a_log_step_without_the_key():
    es = EarlyStopping(monitor="train/acc", check_on="step")
    state = make_state()
    es.on_fit_start(state)
    state.step = 1
    es.on_step_end(state)  # not a log step: nothing to say yet
    state.log({"train/loss": 1.0, "lr": 0.1})
    with pytest.raises(RuntimeError, match=r"'train/acc'.*available keys: lr, train/loss"):
        es.on_step_end(state)


# ----------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_mid_sequence_continues_identically():
    values = [1.0, 0.8, 0.85, 0.79, 0.9, 0.95, 0.99, 0.5]
    reference = EarlyStopping(patience=3, min_delta=0.005)
    ref_stop, ref_state = drive(reference, values)
    assert ref_stop == 6

    first = EarlyStopping(patience=3, min_delta=0.005)
    stop, state = drive(first, values[:5])
    assert stop is None
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # what the checkpointer does
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["best"] == pytest.approx(0.79) and saved["wait_count"] == 1
    assert "best_weights" not in saved

    resumed = EarlyStopping(patience=3, min_delta=0.005)
    resumed.load_state_dict(saved)
    resumed.on_fit_start(state)
    stop, state = drive(resumed, values[5:], state=state)
    assert stop is not None and stop + 5 == ref_stop
    assert resumed.state_dict() == reference.state_dict()
    assert state.stop_reason == ref_state.stop_reason


def test_load_state_dict_of_another_monitor_starts_afresh():
    es = EarlyStopping(monitor="val/accuracy", mode="max")
    with pytest.warns(RuntimeWarning, match="starting the early-stopping state afresh"):
        es.load_state_dict({"monitor": "val/loss", "best": 0.1, "wait_count": 2})
    assert es.best is None and es.wait_count == 0


# ----------------------------------------------------------------------------- best weights


def test_restore_best_weights_loads_the_weights_of_the_best_check():
    es = EarlyStopping(patience=2, restore_best_weights=True)
    state = make_state()
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def new_weights(state: TrainState, i: int) -> None:
        # Stands in for an epoch of training: distinct weights before every check.
        with torch.no_grad():
            for p in state.model.parameters():
                p.copy_(torch.randn_like(p))
        snapshots[i] = copy.deepcopy(state.model.state_dict())

    stop, state = drive(es, [1.0, 0.5, 0.7, 0.6], state=state, on_check=new_weights)
    assert stop == 3 and es.best_step == 20
    last = copy.deepcopy(state.model.state_dict())
    es.on_fit_end(state)
    restored = state.model.state_dict()
    for name in restored:
        assert torch.equal(restored[name], snapshots[1][name]), name
        assert not torch.equal(restored[name], last[name]), name


def test_restore_best_weights_off_keeps_the_last_weights():
    es = EarlyStopping(patience=1)
    stop, state = drive(es, [0.5, 1.0])
    last = copy.deepcopy(state.model.state_dict())
    with torch.no_grad():
        state.model.weight.add_(1.0)
    moved = copy.deepcopy(state.model.state_dict())
    es.on_fit_end(state)
    assert es.best_weights is None
    assert torch.equal(state.model.weight, moved["weight"])
    assert not torch.equal(state.model.weight, last["weight"])


def test_restore_best_weights_after_a_resume_without_improvement_warns():
    es = EarlyStopping(patience=5, restore_best_weights=True)
    es.load_state_dict({"monitor": "val/loss", "best": 0.1, "wait_count": 0, "checks": 3})
    _, state = drive(es, [0.5, 0.6])
    weights = copy.deepcopy(state.model.state_dict())
    with pytest.warns(RuntimeWarning, match="the last weights are kept"):
        es.on_fit_end(state)
    assert torch.equal(state.model.weight, weights["weight"])


# ----------------------------------------------------------------------------- real fits

DATASET = {
    "_target_": "trainer.data.datasets.synthetic",
    "num_samples": 512,
    "input_shape": [16],
    "num_classes": 4,
}
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def make_config(callbacks: dict[str, Any], optim: dict[str, Any], **top: Any) -> TrainConfig:
    fields: dict[str, Any] = {
        "data": DataConfig(dataset=dict(DATASET), batch_size=32, eval_batch_size=128),
        "model": {"_target_": "trainer.models.MLP", "hidden": [32]},
        "optim": optim,
        "schedule": None,
        "parallel": ParallelConfig(),
        "callbacks": callbacks,
        "logger": {},
        "checkpoint": CheckpointConfig(save_final=False),
        "device": "cpu",
        "max_epochs": 20,
        "log_every_steps": 2,
        "test_after_fit": False,
    }
    fields.update(top)
    return TrainConfig(**fields)


class EvalRecorder(Callback):
    """After EarlyStopping in the list: the metric and a copy of the weights at every check."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.values: list[tuple[int, float]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_eval_end(self, state: TrainState) -> None:
        if "val/loss" in state.unlogged:  # validations during the fit only
            self.values.append((state.step, state.metrics[self.monitor]))
            self.weights[state.step] = copy.deepcopy(state.model.state_dict())


def test_fit_stops_at_the_stopping_threshold(tmp_path: Path):
    node = {
        "_target_": "trainer.callbacks.early_stopping.EarlyStopping",
        "monitor": "val/accuracy",
        "mode": "max",
        "stopping_threshold": 0.6,
        "patience": 100,
    }
    cfg = make_config({"es": node}, {"_target_": "torch.optim.AdamW", "lr": 1e-3})
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    recorder = EvalRecorder("val/accuracy")
    trainer.callbacks.append(recorder)
    state = trainer.fit()

    assert state.step < state.max_steps
    accuracies = [acc for _, acc in recorder.values]
    assert accuracies[-1] > 0.6 and all(acc <= 0.6 for acc in accuracies[:-1])
    assert state.step == recorder.values[-1][0] == trainer.callbacks[0].stopped_step
    assert "stopping_threshold 0.6" in state.stop_reason
    assert state.stop_reason.startswith(f"early stopping at step {state.step}:")


def test_fit_stops_when_the_training_loss_diverges(tmp_path: Path):
    node = {
        "_target_": "trainer.callbacks.early_stopping.EarlyStopping",
        "monitor": "train/loss",
        "check_on": "step",
        "divergence_threshold": 5.0,
    }
    # SGD with a huge learning rate: the loss explodes within a few steps.
    cfg = make_config({"es": node}, {"_target_": "torch.optim.SGD", "lr": 50.0})
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    state = trainer.fit()

    assert state.step < state.max_steps
    assert state.step % 2 == 0  # checked on log steps only
    reason = state.stop_reason
    assert "divergence_threshold 5" in reason or "not finite" in reason
    assert state.metrics["train/loss"] > 5.0 or not math.isfinite(state.metrics["train/loss"])
    assert state.metrics["early_stopping/stopped_step"] == state.step


def test_fit_restores_the_weights_of_the_best_validation(tmp_path: Path):
    # Mode max on val/loss makes the best validation the first one (the loss falls), so the last
    # weights differ from the best and the restore is visible.
    node = {
        "_target_": "trainer.callbacks.early_stopping.EarlyStopping",
        "monitor": "val/loss",
        "mode": "max",
        "patience": 2,
        "restore_best_weights": True,
    }
    cfg = make_config({"es": node}, {"_target_": "torch.optim.AdamW", "lr": 1e-2})
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    recorder = EvalRecorder("val/loss")
    trainer.callbacks.append(recorder)
    es = trainer.callbacks[0]
    state = trainer.fit()

    steps = [s for s, _ in recorder.values]
    losses = [v for _, v in recorder.values]
    assert len(steps) == 3 and state.step == steps[-1] < state.max_steps
    best = steps[losses.index(max(losses))]
    assert es.best_step == best == steps[0]
    final = trainer.model.state_dict()
    for name, tensor in final.items():
        assert torch.equal(tensor, recorder.weights[best][name]), name
    assert not torch.equal(final["net.1.weight"], recorder.weights[steps[-1]]["net.1.weight"])
