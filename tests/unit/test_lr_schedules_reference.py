"""Every schedule in `trainer.callbacks.lr_schedule` against the `torch.optim.lr_scheduler` it
reproduces, on an optimizer with two parameter groups of different rates.

Two references per torch scheduler:
- its closed form (`_get_closed_form_lr` at `last_epoch = t`), where torch has one: compared with
  `==`, because the schedule evaluates the same expression on the same numbers;
- the scheduler stepped as usual (`optimizer.step(); scheduler.step()`): StepLR, MultiStepLR,
  ExponentialLR, CosineAnnealingLR, LinearLR and SequentialLR update the rate recursively
  (`lr * gamma`, ratios of cosines), which drifts from any closed form in the last bits, so these
  are compared within 1e-12 relative. OneCycleLR and ReduceLROnPlateau compute each value
  directly (no recursion to drift), so they are compared with `==`.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

import trainer.cli
from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.callbacks.lr_schedule import (
    Constant,
    Cosine,
    ExponentialDecay,
    InverseSqrt,
    LRSchedule,
    MultiStepDecay,
    OneCycle,
    ReduceOnPlateau,
    StepDecay,
    WarmupCosine,
    WarmupLinear,
)
from trainer.config import CheckpointConfig, DataConfig, TrainConfig, build, validate
from trainer.distributed.env import DistEnv
from trainer.state import TrainState, rate_metrics

LRS = (0.1, 0.03)  # the two groups' configured rates
TOTAL = 100
REL = 1e-12

Rates = list[list[float]]  # rates[t][group]


def _optimizer(lrs: tuple[float, ...] = LRS) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _state(lrs: tuple[float, ...] = LRS, max_steps: int = TOTAL, steps_per_epoch: int = TOTAL):
    return TrainState(
        model=torch.nn.Linear(1, 1),
        optimizer=_optimizer(lrs),
        max_steps=max_steps,
        steps_per_epoch=steps_per_epoch,
    )


def _rates(state: TrainState) -> list[float]:
    return [g["lr"] for g in state.optimizer.param_groups]


def drive(schedule: LRSchedule, total: int = TOTAL, lrs=LRS, steps_per_epoch: int = 0) -> Rates:
    """The rates of every step, calling the hooks as the loop does. `steps_per_epoch=0`: one
    epoch of `total` steps; else `total` epochs of `steps_per_epoch` steps each."""
    per_epoch = steps_per_epoch or total
    epochs = total if steps_per_epoch else 1
    state = _state(lrs, epochs * per_epoch, per_epoch)
    schedule.on_fit_start(state)
    rates = []
    for epoch in range(epochs):
        state.epoch = epoch
        schedule.on_epoch_start(state)
        for _ in range(per_epoch):
            schedule.on_step_start(state)
            rates.append(_rates(state))
            state.step += 1
            schedule.on_step_end(state)
        schedule.on_epoch_end(state)
    return rates


Factory = Callable[[torch.optim.Optimizer, int], LRScheduler]


def _per_group(make: Factory, total: int, lrs, per_group: bool, run) -> Rates:
    """`run(make, total, lrs)` on one optimizer, or on one optimizer per group (for torch
    arguments that are absolute rates, such as eta_min = min_ratio * that group's lr)."""
    if not per_group:
        return run(make, total, lrs)
    columns = [run(make, total, (lr,)) for lr in lrs]
    return [[col[t][0] for col in columns] for t in range(total)]


def _stepped(make: Factory, total: int, lrs) -> Rates:
    optimizer = _optimizer(lrs)
    scheduler = make(optimizer, total)
    rates = []
    for _ in range(total):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def _closed(make: Factory, total: int, lrs) -> Rates:
    scheduler = make(_optimizer(lrs), total)
    rates = []
    for t in range(total):
        scheduler.last_epoch = t
        rates.append(list(scheduler._get_closed_form_lr()))
    return rates


def torch_stepped(make: Factory, total: int = TOTAL, lrs=LRS, per_group=False) -> Rates:
    return _per_group(make, total, lrs, per_group, _stepped)


def torch_closed_form(make: Factory, total: int = TOTAL, lrs=LRS, per_group=False) -> Rates:
    return _per_group(make, total, lrs, per_group, _closed)


def assert_close(got: Rates, want: Rates) -> None:
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a == pytest.approx(b, rel=REL, abs=0), f"t={t}"


def _warmup(w: int, after: Factory) -> Factory:
    def make(optimizer: torch.optim.Optimizer, total: int) -> LRScheduler:
        warm = LinearLR(optimizer, start_factor=1 / w, end_factor=1.0, total_iters=w - 1)
        return SequentialLR(optimizer, [warm, after(optimizer, total - w)], milestones=[w])

    return make


def _eta_min(ratio: float) -> Callable[[torch.optim.Optimizer], float]:
    # One group per optimizer; its "initial_lr" where a warm-up scheduler built first has already
    # lowered "lr".
    return lambda optimizer: (
        ratio * optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    )


# (our schedule, its torch scheduler, torch has a closed form, torch needs one optimizer per group)
CASES: dict[str, tuple[Callable[..., LRSchedule], Factory, bool, bool]] = {
    "step": (
        lambda **kw: StepDecay(7, 0.7, **kw),
        lambda o, n: StepLR(o, step_size=7, gamma=0.7),
        True,
        False,
    ),
    "multistep": (
        lambda **kw: MultiStepDecay([10, 25, 60], gamma=0.3, **kw),
        lambda o, n: MultiStepLR(o, milestones=[10, 25, 60], gamma=0.3),
        True,
        False,
    ),
    "exponential": (
        lambda **kw: ExponentialDecay(0.97, **kw),
        lambda o, n: ExponentialLR(o, gamma=0.97),
        True,
        False,
    ),
    "cosine": (
        lambda **kw: Cosine(**kw),
        lambda o, n: CosineAnnealingLR(o, T_max=n),
        True,
        False,
    ),
    "cosine_min_ratio": (
        lambda **kw: Cosine(min_ratio=0.2, **kw),
        lambda o, n: CosineAnnealingLR(o, T_max=n, eta_min=_eta_min(0.2)(o)),
        True,
        True,
    ),
    "warmup_cosine": (
        lambda **kw: WarmupCosine(10, **kw),
        _warmup(10, lambda o, n: CosineAnnealingLR(o, T_max=n)),
        False,
        False,
    ),
    "warmup_cosine_min_ratio": (
        lambda **kw: WarmupCosine(6, 0.1, **kw),
        _warmup(6, lambda o, n: CosineAnnealingLR(o, T_max=n, eta_min=_eta_min(0.1)(o))),
        False,
        True,
    ),
    "warmup_linear": (
        lambda **kw: WarmupLinear(10, 0.1, **kw),
        _warmup(10, lambda o, n: LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=n)),
        False,
        False,
    ),
    "onecycle": (
        lambda **kw: OneCycle(**kw),
        lambda o, n: OneCycleLR(
            o, max_lr=[g["lr"] for g in o.param_groups], total_steps=n, cycle_momentum=False
        ),
        False,
        False,
    ),
    "onecycle_custom": (
        lambda **kw: OneCycle(pct_start=0.45, div_factor=10.0, final_div_factor=100.0, **kw),
        lambda o, n: OneCycleLR(
            o,
            max_lr=[g["lr"] for g in o.param_groups],
            total_steps=n,
            pct_start=0.45,
            div_factor=10.0,
            final_div_factor=100.0,
            cycle_momentum=False,
        ),
        False,
        False,
    ),
}
EXACT_WHEN_STEPPED = {"onecycle", "onecycle_custom"}  # torch computes these directly
CLOSED = [name for name, case in CASES.items() if case[2]]


# ------------------------------------------------------------------------ per step, per epoch


@pytest.mark.parametrize("name", CASES)
def test_per_step_matches_torch_stepped(name):
    ours, make, _, per_group = CASES[name]
    got, want = drive(ours()), torch_stepped(make, per_group=per_group)
    if name in EXACT_WHEN_STEPPED:
        assert got == want
    else:
        assert_close(got, want)
    assert got[0] != got[-1]


@pytest.mark.parametrize("name", CLOSED)
def test_per_step_equals_torch_closed_form(name):
    ours, make, _, per_group = CASES[name]
    assert drive(ours()) == torch_closed_form(make, per_group=per_group)


@pytest.mark.parametrize("name", ["step", "exponential", "cosine", "onecycle", "warmup_linear"])
def test_per_epoch_matches_torch_stepped_once_an_epoch(name):
    ours, make, closed, per_group = CASES[name]
    epochs, steps_per_epoch = 20, 3
    got = drive(ours(interval="epoch"), epochs, steps_per_epoch=steps_per_epoch)
    reference = torch_closed_form if closed else torch_stepped
    per_epoch = reference(make, epochs, per_group=per_group)
    want = [rates for rates in per_epoch for _ in range(steps_per_epoch)]  # constant in an epoch
    if closed or name in EXACT_WHEN_STEPPED:
        assert got == want
    else:
        assert_close(got, want)


@pytest.mark.parametrize("total", [1, 2, 3, 7])
def test_onecycle_short_runs_match_torch(total):
    _, make, _, _ = CASES["onecycle"]
    assert drive(OneCycle(), total) == torch_stepped(make, total)


def test_onecycle_starts_at_lr_over_div_factor_and_peaks_at_lr():
    rates = drive(OneCycle(pct_start=0.3, div_factor=25.0), TOTAL)
    assert rates[0] == pytest.approx([lr / 25.0 for lr in LRS], rel=1e-14)
    assert rates[29] == list(LRS)  # step pct_start * total - 1
    assert rates[-1][0] == pytest.approx(LRS[0] / 25.0 / 1e4, rel=1e-9)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_inverse_sqrt_closed_form(interval):
    decay, steps_per_epoch = 0.05, 4 if interval == "epoch" else 0
    got = drive(InverseSqrt(decay, interval=interval), 60, steps_per_epoch=steps_per_epoch)
    clock = [t // steps_per_epoch if steps_per_epoch else t for t in range(len(got))]
    assert got == [[lr / math.sqrt(1 + decay * t) for lr in LRS] for t in clock]


def test_constant_keeps_every_group_rate():
    assert drive(Constant(), 10) == [list(LRS)] * 10


# ------------------------------------------------------------------------ logging


def test_rates_are_logged_per_group_at_fit_start_and_in_the_loops_form():
    state = _state(max_steps=20)
    schedule = StepDecay(5, 0.5)
    schedule.on_fit_start(state)
    assert state.unlogged == {"lr": 0.1, "lr/group0": 0.1, "lr/group1": 0.03}
    state.unlogged.clear()
    for step in range(20):
        state.step = step
        schedule.on_step_start(state)
    # A step schedule leaves the logging of each step's rates to the loop's log steps, which log
    # `rate_metrics`: the rates in use, per group, as plain floats.
    assert state.unlogged == {}
    logged = rate_metrics(state.optimizer)
    assert logged == pytest.approx({"lr": 0.1 / 8, "lr/group0": 0.1 / 8, "lr/group1": 0.03 / 8})
    assert all(type(v) is float for v in logged.values())


# ------------------------------------------------------------------------ resume


def _resumed_rates(schedule: LRSchedule, fresh: LRSchedule, stop: int, total: int = 40):
    """Rates of `fresh` resumed at step `stop` from `schedule`'s state after `stop` steps, with
    the optimizer holding the rate of that step (as a checkpoint restores it)."""
    state = _state(max_steps=total)
    schedule.on_fit_start(state)
    for step in range(stop):
        state.step = step
        schedule.on_step_start(state)
    saved = _through_torch_save(schedule.state_dict())
    resumed = _state([g["lr"] for g in state.optimizer.param_groups], max_steps=total)
    resumed.step = stop
    fresh.load_state_dict(saved)
    fresh.on_fit_start(resumed)
    rates = []
    for step in range(stop, total):
        resumed.step = step
        fresh.on_step_start(resumed)
        rates.append(_rates(resumed))
    return rates


def _through_torch_save(state: dict[str, Any]) -> dict[str, Any]:
    """What the checkpointer stores and loads back (torch.save, torch.load(weights_only=True))."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["warmup_cosine", "onecycle", "step"])
def test_pure_schedule_resumes_from_its_initial_rates(name):
    ours = CASES[name][0]
    assert _resumed_rates(ours(), ours(), stop=13) == drive(ours(), 40)[13:]


# ------------------------------------------------------------------------ reduce on plateau

# Hand-made: improvements, values inside the relative threshold (not improvements), bad runs
# longer than patience, bad values during the cooldown, and enough reductions to hit min_lr.
PLATEAU_METRICS = [
    1.0, 0.9, 0.895, 0.893, 0.892, 0.85, 0.95, 0.96, 0.97, 0.99, 0.84, 0.8412,
    0.8, 0.81, 0.82, 0.83, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77, 0.78,
    0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.594, 0.5941, 0.59, 0.6, 0.61,
]  # fmt: skip
PLATEAU_ARGS = {
    "factor": 0.5,
    "patience": 2,
    "threshold": 0.01,
    "cooldown": 2,
    "min_lr": 0.004,
}


def _plateau_ours(metrics, lrs=LRS, schedule=None, state=None, **kwargs) -> Rates:
    """Feed `metrics` as val/loss, one evaluation after each of 3 steps; rates after each."""
    schedule = schedule or ReduceOnPlateau(**kwargs)
    if state is None:
        state = _state(lrs, max_steps=1000)
        schedule.on_fit_start(state)
    rates = []
    for value in metrics:
        for _ in range(3):
            schedule.on_step_start(state)
            state.step += 1
        state.log({"val/loss": value})
        schedule.on_eval_end(state)
        rates.append(_rates(state))
    return rates


def _plateau_torch(metrics, lrs=LRS, **kwargs) -> Rates:
    optimizer = _optimizer(lrs)
    scheduler = ReduceLROnPlateau(optimizer, threshold_mode="rel", **kwargs)
    rates = []
    for value in metrics:
        optimizer.step()
        scheduler.step(value)
        rates.append([g["lr"] for g in optimizer.param_groups])
    return rates


@pytest.mark.parametrize(
    "kwargs",
    [
        PLATEAU_ARGS,
        {**PLATEAU_ARGS, "cooldown": 0, "patience": 0},
        {**PLATEAU_ARGS, "threshold": 0.0, "min_lr": 0.0},
        {**PLATEAU_ARGS, "mode": "max"},
        {},  # torch's defaults
    ],
    ids=["mixed", "no_patience", "no_threshold", "max", "defaults"],
)
def test_plateau_matches_torch(kwargs):
    got = _plateau_ours(PLATEAU_METRICS, **kwargs)
    want = _plateau_torch(PLATEAU_METRICS, **kwargs)
    assert got == want
    if kwargs is PLATEAU_ARGS:  # the sequence exercises what it claims to
        assert len({tuple(r) for r in got}) >= 5
        assert got[-1][1] == 0.004  # group 1 held at min_lr


def test_plateau_state_dict_round_trip_continues_exactly():
    split = 17
    whole = ReduceOnPlateau(**PLATEAU_ARGS)
    full = _plateau_ours(PLATEAU_METRICS, schedule=whole)

    first = ReduceOnPlateau(**PLATEAU_ARGS)
    state = _state(max_steps=1000)
    first.on_fit_start(state)
    head = _plateau_ours(PLATEAU_METRICS[:split], schedule=first, state=state)
    saved = _through_torch_save(first.state_dict())
    assert saved["lrs"] == head[-1] != list(LRS)  # it did reduce before the split
    assert saved["cooldown_left"] > 0 or saved["bad_evals"] > 0  # mid-way through a count

    # A new process: the optimizer holds the rates of the checkpoint, the schedule is new.
    resumed_state = _state(tuple(head[-1]), max_steps=1000)
    resumed_state.step = state.step
    second = ReduceOnPlateau(**PLATEAU_ARGS)
    second.load_state_dict(saved)
    second.on_fit_start(resumed_state)
    tail = _plateau_ours(PLATEAU_METRICS[split:], schedule=second, state=resumed_state)
    assert head + tail == full
    assert second.state_dict() == whole.state_dict()


def test_plateau_reads_one_value_per_step():
    schedule = ReduceOnPlateau(patience=0, factor=0.5)
    state = _state(max_steps=10)
    schedule.on_fit_start(state)
    state.step = 1
    state.log({"val/loss": 1.0})
    schedule.on_eval_end(state)
    state.log({"val/loss": 2.0})  # a worse value...
    schedule.on_eval_end(state)  # ...at the same step (e.g. the test split after fit): ignored
    assert _rates(state) == list(LRS)
    state.step = 2
    schedule.on_eval_end(state)  # a new step: counted, patience 0 -> halved
    assert _rates(state) == [lr * 0.5 for lr in LRS]


# ------------------------------------------------------------------------ arguments, recipes

INVALID = [
    (StepDecay, {"step_size": 0}, "step_size"),
    (StepDecay, {"step_size": 2.5}, "step_size"),
    (StepDecay, {"step_size": 3, "gamma": 0.0}, "gamma"),
    (StepDecay, {"step_size": 3, "gamma": float("nan")}, "gamma"),
    (StepDecay, {"step_size": 3, "interval": "batch"}, "interval"),
    (MultiStepDecay, {"milestones": [5, 3]}, "milestones"),
    (MultiStepDecay, {"milestones": [0, 3]}, "milestones"),
    (MultiStepDecay, {"milestones": 5}, "milestones"),
    (MultiStepDecay, {"milestones": [2, 4], "gamma": -1.0}, "gamma"),
    (ExponentialDecay, {"gamma": 0}, "gamma"),
    (Cosine, {"min_ratio": 1.5}, "min_ratio"),
    (Cosine, {"interval": "epochs"}, "interval"),
    (WarmupCosine, {"warmup_steps": -1}, "warmup_steps"),
    (WarmupLinear, {"warmup_steps": 1.5}, "warmup_steps"),
    (WarmupLinear, {"min_ratio": -0.1}, "min_ratio"),
    (OneCycle, {"pct_start": 1.2}, "pct_start"),
    (OneCycle, {"div_factor": 0.0}, "div_factor"),
    (OneCycle, {"final_div_factor": -1.0}, "final_div_factor"),
    (InverseSqrt, {"decay": -0.1}, "decay"),
    (ReduceOnPlateau, {"monitor": ""}, "monitor"),
    (ReduceOnPlateau, {"mode": "avg"}, "mode"),
    (ReduceOnPlateau, {"factor": 1.0}, "factor"),
    (ReduceOnPlateau, {"patience": -1}, "patience"),
    (ReduceOnPlateau, {"threshold": -0.1}, "threshold"),
    (ReduceOnPlateau, {"cooldown": 0.5}, "cooldown"),
    (ReduceOnPlateau, {"min_lr": -1.0}, "min_lr"),
    (ReduceOnPlateau, {"eps": -1.0}, "eps"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"), INVALID, ids=[f"{c.__name__}-{n}" for c, _, n in INVALID]
)
def test_invalid_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        cls(**kwargs)


NEW_RECIPES = {
    "step": StepDecay,
    "multistep": MultiStepDecay,
    "exponential": ExponentialDecay,
    "cosine": Cosine,
    "warmup_cosine": WarmupCosine,
    "warmup_linear": WarmupLinear,
    "onecycle": OneCycle,
    "plateau": ReduceOnPlateau,
    "inverse_sqrt": InverseSqrt,
    "constant": Constant,
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(trainer.cli.recipes_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("name", NEW_RECIPES)
def test_recipe_composes_validates_and_builds(name):
    path = trainer.cli.recipes_dir() / "schedule" / f"{name}.yaml"
    assert path.read_text().startswith("# ")  # a one-line comment says what it does
    typed = validate(_compose([f"schedule={name}"]))
    schedule = build(typed.schedule, "schedule", typed.allowed_targets)
    assert type(schedule) is NEW_RECIPES[name]


def test_recipe_with_a_wrong_type_is_refused():
    with pytest.raises(ValueError, match="schedule.step_size"):
        validate(_compose(["schedule=step", "schedule.step_size=2.5"]))


# ------------------------------------------------------------------------ a real Trainer


class Recorder(Callback):
    """The rates of every group as each step starts (after the schedule, which runs first)."""

    def __init__(self) -> None:
        self.rates: Rates = []
        self.evals: list[float] = []  # val/loss of each validation

    def on_step_start(self, state: TrainState) -> None:
        self.rates.append([g["lr"] for g in state.optimizer.param_groups])

    def on_eval_end(self, state: TrainState) -> None:
        self.evals.append(state.metrics["val/loss"])


def _trainer(run_dir: Path, schedule: dict[str, Any], two_groups: bool = True, **top: Any):
    cfg = TrainConfig(
        data=DataConfig(
            dataset={"_target_": "trainer.data.datasets.synthetic", "num_samples": 256},
            batch_size=32,
        ),
        model={"_target_": "trainer.models.MLP", "hidden": [16]},
        optim={"_target_": "torch.optim.SGD", "lr": LRS[0], "momentum": 0.9},
        schedule={"_target_": f"trainer.callbacks.lr_schedule.{schedule.pop('name')}", **schedule},
        logger={},
        callbacks={},
        checkpoint=CheckpointConfig(save_final=False, **top.pop("checkpoint", {})),
        device="cpu",
        test_after_fit=False,
        **{"max_epochs": 3, "log_every_steps": 1, **top},
    )
    fit, _ = build_trainer(
        cfg, DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")), run_dir
    )
    if two_groups:  # the weights at LRS[0], the biases at LRS[1]
        optimizer = fit.optimizer
        params = [p for g in optimizer.param_groups for p in g["params"]]
        options = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.param_groups.clear()
        for lr, chunk in zip(
            LRS,
            ([p for p in params if p.ndim > 1], [p for p in params if p.ndim == 1]),
            strict=True,
        ):
            optimizer.add_param_group({**options, "params": chunk, "lr": lr})
    recorder = Recorder()
    fit.callbacks.append(recorder)
    return fit, recorder


def test_trainer_onecycle_per_step_matches_torch(tmp_path):
    fit, recorder = _trainer(tmp_path, {"name": "OneCycle", "pct_start": 0.25})
    state = fit.fit()
    total = state.max_steps
    assert total == 18 and len(recorder.rates) == total
    make = lambda o, n: OneCycleLR(  # noqa: E731
        o, max_lr=list(LRS), total_steps=n, pct_start=0.25, cycle_momentum=False
    )
    assert recorder.rates == torch_stepped(make, total)
    assert state.metrics["lr/group1"] == recorder.rates[-1][1]


def test_trainer_step_decay_per_epoch_matches_torch(tmp_path):
    fit, recorder = _trainer(
        tmp_path,
        {"name": "StepDecay", "step_size": 2, "gamma": 0.7, "interval": "epoch"},
        max_epochs=5,
    )
    state = fit.fit()
    per_epoch = torch_closed_form(lambda o, n: StepLR(o, step_size=2, gamma=0.7), 5)
    assert recorder.rates == [r for r in per_epoch for _ in range(state.steps_per_epoch)]


def test_trainer_plateau_matches_torch_on_the_real_val_losses(tmp_path):
    # mode=max on a falling loss: every validation is "worse", so the rate keeps falling.
    plateau = {"name": "ReduceOnPlateau", "mode": "max", "patience": 1, "factor": 0.5}
    fit, recorder = _trainer(tmp_path, plateau, max_epochs=6)
    state = fit.fit()
    assert len(recorder.evals) == 6
    per_eval = _plateau_torch(recorder.evals, mode="max", patience=1, factor=0.5)
    spe = state.steps_per_epoch
    want = [list(LRS)] * spe + [r for r in per_eval[:-1] for _ in range(spe)]
    assert recorder.rates == want
    assert _rates(state) == per_eval[-1] != list(LRS)
    counters = fit.callbacks[0].state_dict()
    fit.test()  # evaluates the test split at the step of the last validation: not a reading
    assert fit.callbacks[0].state_dict() == counters
    assert _rates(state) == per_eval[-1]


@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "ReduceOnPlateau", "mode": "max", "patience": 0, "factor": 0.5},
        {"name": "WarmupCosine", "warmup_steps": 4, "min_ratio": 0.1},
    ],
    ids=["plateau", "warmup_cosine"],
)
def test_trainer_resumed_from_a_checkpoint_continues_the_rates(tmp_path, schedule):
    fit, recorder = _trainer(
        tmp_path / "a", dict(schedule), two_groups=False, checkpoint={"every_steps": 9}
    )
    fit.fit()
    (mid,) = [p for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.endswith("09")]
    again, resumed = _trainer(tmp_path / "b", dict(schedule), two_groups=False, resume=str(mid))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.fit()
    assert again.state.step == 18
    assert resumed.rates == recorder.rates[9:]
    assert len({r[0] for r in resumed.rates}) >= 2  # the rate changes after the resume


def test_plateau_without_its_metric_warns_and_keeps_the_rate():
    schedule = ReduceOnPlateau(monitor="val/accuracy")
    state = _state()
    schedule.on_fit_start(state)
    state.step = 1
    state.log({"test/loss": 1.0})
    with pytest.warns(UserWarning, match="val/accuracy"):
        schedule.on_eval_end(state)
    assert _rates(state) == list(LRS)


def test_a_schedule_instance_can_be_reused_for_another_fit():
    schedule = WarmupCosine(10)
    first = drive(schedule, 30)
    assert drive(schedule, 30, lrs=(0.5, 0.2))[0] == pytest.approx([0.05, 0.02])
    assert drive(schedule, 30) == first
