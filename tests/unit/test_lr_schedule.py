"""Learning-rate schedules (`trainer.callbacks.lr_schedule`) against `torch.optim.lr_scheduler.
LambdaLR` with the same factor, and `WarmupCosine` against an independent closed form."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.helpers

from tests.helpers import make_trainer  # noqa: E402
from trainer.callbacks.base import Callback  # noqa: E402
from trainer.callbacks.lr_schedule import Constant, LRSchedule, WarmupCosine  # noqa: E402
from trainer.state import TrainState  # noqa: E402


def _optimizer(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _schedule_rates(schedule: LRSchedule, lrs: tuple[float, ...], total: int) -> list[list[float]]:
    """The rate of every group before each step 0..total-1, driving the callback as the loop does."""
    optimizer = _optimizer(*lrs)
    model = torch.nn.Linear(1, 1)
    state = TrainState(model=model, optimizer=optimizer, max_steps=total, steps_per_epoch=total)
    schedule.on_fit_start(state)
    rates = []
    for step in range(total):
        state.step = step
        schedule.on_step_start(state)
        rates.append([g["lr"] for g in optimizer.param_groups])
    return rates


def _lambdalr_rates(factor, lrs: tuple[float, ...], total: int) -> list[list[float]]:
    optimizer = _optimizer(*lrs)
    scheduler = LambdaLR(optimizer, lr_lambda=factor)
    rates = []
    for _ in range(total):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def _closed_form(t: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up reaching `lr` at step warmup-1; then cosine from `lr` at step `warmup` down
    to `min_ratio * lr` at t = total, the end of the run, one past the last step t = total-1
    (`WarmupDecay`'s docstring; torch's `CosineAnnealingLR(T_max=total - warmup)` and Hugging
    Face's `get_cosine_schedule_with_warmup` count it the same way)."""
    if t < warmup:
        return lr * (t + 1) / warmup
    progress = min((t - warmup) / (total - warmup), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


SCHEDULES = [  # factories: every test gets a fresh callback
    pytest.param(Constant, id="constant"),
    pytest.param(WarmupCosine, id="cosine"),
    pytest.param(lambda: WarmupCosine(warmup_steps=5), id="warmup5"),
    pytest.param(lambda: WarmupCosine(warmup_steps=7, min_ratio=0.1), id="warmup7_min0.1"),
    pytest.param(lambda: WarmupCosine(warmup_steps=40, min_ratio=0.2), id="warmup_beyond_total"),
    pytest.param(lambda: WarmupCosine(min_ratio=1.0), id="min_ratio1"),
]


@pytest.mark.parametrize("make", SCHEDULES)
@pytest.mark.parametrize("total", [1, 2, 30])
def test_matches_lambdalr(make, total):
    schedule, lrs = make(), (0.3,)
    got = _schedule_rates(schedule, lrs, total)
    want = _lambdalr_rates(lambda step: schedule.factor(step, total), lrs, total)
    assert got == want  # exact: the same multiplication of the same numbers


def test_constant_keeps_initial_rate():
    assert _schedule_rates(Constant(), (0.25,), 10) == [[0.25]] * 10


@pytest.mark.parametrize(
    ("warmup", "total", "min_ratio"),
    [(5, 50, 0.1), (0, 20, 0.0), (1, 10, 0.5), (10, 30, 0.0), (3, 5, 0.05)],
)
def test_warmup_cosine_closed_form(warmup, total, min_ratio):
    lr = 0.4
    schedule = WarmupCosine(warmup, min_ratio)
    got = [r[0] for r in _schedule_rates(schedule, (lr,), total)]
    want = [_closed_form(t, total, lr, warmup, min_ratio) for t in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)

    if warmup:
        assert got[0] == pytest.approx(lr / warmup)
        assert got[warmup - 1] == pytest.approx(lr)  # the warm-up reaches lr at step warmup-1
        assert all(a < b for a, b in zip(got[:warmup], got[1:warmup], strict=False))
    assert got[warmup] == pytest.approx(lr)
    decay = got[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # strictly decreasing
    # min_ratio * lr is reached at t = total, the end of the run, and kept beyond it; the last
    # step, t = total-1, still runs above it.
    for t in (total, total + 3):
        assert lr * schedule.factor(t, total) == pytest.approx(
            _closed_form(t, total, lr, warmup, min_ratio)
        )
        assert lr * schedule.factor(t, total) == pytest.approx(min_ratio * lr, abs=1e-15)
    assert got[-1] > min_ratio * lr


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_steps": -1},
        {"warmup_steps": 2.5},
        {"min_ratio": -0.1},
        {"min_ratio": 1.5},
        {"min_ratio": float("nan")},
        {"min_ratio": float("inf")},
    ],
    ids=str,
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        WarmupCosine(**kwargs)


def test_base_class_needs_a_factor():
    with pytest.raises(NotImplementedError):
        LRSchedule().factor(0, 10)


@pytest.mark.parametrize("make", SCHEDULES[1:4])
def test_each_param_group_scaled_from_its_own_rate(make):
    schedule, lrs, total = make(), (0.1, 0.02, 3.0), 25
    got = _schedule_rates(schedule, lrs, total)
    want = _lambdalr_rates(lambda step: schedule.factor(step, total), lrs, total)
    assert got == want
    for step, row in enumerate(got):
        factor = schedule.factor(step, total)
        assert row == [lr * factor for lr in lrs]


def test_rate_seen_inside_the_loop(tmp_path):
    class LrSeen(Callback):
        def __init__(self) -> None:
            self.rates: list[float] = []
            self.logged: list[float] = []

        def on_step_start(self, state: TrainState) -> None:
            self.rates.append(state.optimizer.param_groups[0]["lr"])

        def on_step_end(self, state: TrainState) -> None:
            self.logged.append(state.metrics["lr"])

    seen = LrSeen()
    trainer = make_trainer(
        tmp_path,
        schedule={
            "_target_": "trainer.callbacks.lr_schedule.WarmupCosine",
            "warmup_steps": 4,
            "min_ratio": 0.1,
        },
        optim={"_target_": "torch.optim.SGD", "lr": 0.2, "momentum": 0.9},
        max_epochs=3,
        log_every_steps=1,
        callbacks=[seen],
    )
    schedule = trainer.callbacks[0]
    assert isinstance(schedule, WarmupCosine)  # the schedule runs first, then our callback
    total = trainer.state.max_steps
    assert total == 3 * 8
    trainer.fit()

    want = [r[0] for r in _lambdalr_rates(lambda s: schedule.factor(s, total), (0.2,), total)]
    assert seen.rates == want
    assert seen.logged == want  # the logged "lr" is the rate the step used
    assert len(set(want)) > total // 2  # the rate really changed along the run
