"""`DropoutSchedule`: the rate the model really uses at each step, read inside its forward.

Forward pre-hooks record ``p`` of every ``nn.Dropout`` and ``attn_dropout`` of every
``SelfAttention`` during training forwards; each test compares them with the schedule's closed
form written out by hand, or, for early and late dropout, with Liu et al.'s per-iteration array
rebuilt with numpy as their code builds it (`tests/schedule_reference.py`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.schedule_reference import liu_schedule
from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.callbacks.dropout_schedule import DropoutSchedule, canonical_name, find_targets
from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig
from trainer.distributed.env import DistEnv
from trainer.distributed.parallelize import apply_activation_checkpointing
from trainer.loop import Trainer
from trainer.models import MLP, TransformerClassifier
from trainer.models.attention import SelfAttention
from trainer.state import TrainState

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TARGET = "trainer.callbacks.dropout_schedule.DropoutSchedule"
# 320 samples -> 256 train: 8 steps of 32 per epoch.
DATASET = {
    "_target_": "trainer.data.datasets.synthetic",
    "num_samples": 320,
    "input_shape": [8],
    "num_classes": 4,
}
MLP_NODE = {"_target_": "trainer.models.MLP", "hidden": [16, 16], "dropout": 0.0}
TRANSFORMER_NODE = {
    "_target_": "trainer.models.TransformerClassifier",
    "dim": 16,
    "depth": 2,
    "heads": 2,
    "dropout": 0.05,
    "attn_dropout": 0.05,
}
STEPS_PER_EPOCH = 8


class RateProbe(Callback):
    """Records, per optimizer step (or epoch), the rates each dropout site reads in its training
    forwards. It only tracks the step; forward pre-hooks do the reading."""

    def __init__(self) -> None:
        self.step = -1
        self.epoch = -1
        # name -> step -> set of rates seen in that step's forwards
        self.seen: dict[str, dict[int, set[float]]] = defaultdict(lambda: defaultdict(set))
        self.epochs: dict[str, dict[int, set[float]]] = defaultdict(lambda: defaultdict(set))

    def attach(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Dropout):
                module.register_forward_pre_hook(self._hook(canonical_name(name), "p"))
            elif isinstance(module, SelfAttention):
                module.register_forward_pre_hook(self._hook(canonical_name(name), "attn_dropout"))

    def _hook(self, name: str, attr: str):
        def read(module: nn.Module, args: Any) -> None:
            if module.training:
                rate = getattr(module, attr)
                self.seen[f"{name}.{attr}"][self.step].add(rate)
                self.epochs[f"{name}.{attr}"][self.epoch].add(rate)

        return read

    def on_epoch_start(self, state: TrainState) -> None:
        self.epoch = state.epoch

    def on_step_start(self, state: TrainState) -> None:
        self.step = state.step

    def rates(self, name: str, by: str = "step") -> dict[int, float]:
        table = self.seen if by == "step" else self.epochs
        out = {}
        for t, values in table[name].items():
            assert len(values) == 1, f"{name} changed inside {by} {t}: {values}"
            out[t] = next(iter(values))
        return out


def fit(
    tmp_path: Path,
    schedule: dict[str, Any] | None,
    *,
    model: dict[str, Any] = MLP_NODE,
    max_steps: int = 24,
) -> tuple[Trainer, RateProbe]:
    callbacks = {} if schedule is None else {"dropout": {"_target_": TARGET, **schedule}}
    cfg = TrainConfig(
        data=DataConfig(dataset=dict(DATASET), batch_size=32, eval_batch_size=128),
        model=dict(model),
        optim={"_target_": "torch.optim.SGD", "lr": 0.05},
        schedule=None,
        parallel=ParallelConfig(),
        callbacks=callbacks,
        logger={},
        checkpoint=CheckpointConfig(save_final=False),
        device="cpu",
        max_steps=max_steps,
        log_every_steps=1,
        test_after_fit=False,
    )
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    probe = RateProbe()
    probe.attach(trainer.model)
    trainer.callbacks.append(probe)  # after the schedule: it sees what the model will use
    trainer.fit()
    return trainer, probe


MLP_SITES = ["net.3.p", "net.6.p"]  # Flatten, [Linear, ReLU, Dropout] * 2, Linear


def cos_anneal(s: float, e: float, t: float, length: float) -> float:
    return e + (s - e) * (1 + math.cos(math.pi * min(t / length, 1.0))) / 2


# Closed forms p(t) for a run of T = 24 steps, written independently of the implementation.
CASES: dict[str, tuple[dict[str, Any], Any]] = {
    "constant": ({"schedule": "constant", "start_value": 0.3}, lambda t: 0.3),
    "linear-run": (
        {"schedule": "linear", "start_value": 0.4, "end_value": 0.1},
        lambda t: 0.4 - 0.3 * t / 24,
    ),
    "linear-until": (
        {"schedule": "linear", "start_value": 0.0, "end_value": 0.5, "until_step": 10},
        lambda t: 0.05 * t if t < 10 else 0.5,
    ),
    "cosine-run": (
        {"schedule": "cosine", "start_value": 0.5, "end_value": 0.1},
        lambda t: cos_anneal(0.5, 0.1, t, 24),
    ),
    "cosine-until": (
        {"schedule": "cosine", "start_value": 0.2, "end_value": 0.0, "until_step": 12},
        lambda t: 0.1 * (1 + math.cos(math.pi * t / 12)) if t < 12 else 0.0,
    ),
    "step": (
        {
            "schedule": "step",
            "start_value": 0.3,
            "milestones": [5, 9, 20],
            "values": [0.2, 0.0, 0.25],
        },
        lambda t: 0.3 if t < 5 else 0.2 if t < 9 else 0.0 if t < 20 else 0.25,
    ),
    "early-constant": (
        {"schedule": "early", "start_value": 0.3, "until_step": 7},
        lambda t: liu_schedule(0.3, 24, 7, "early", "constant")[t],
    ),
    "early-linear": (
        {"schedule": "early", "start_value": 0.4, "until_step": 8, "early_mode": "linear"},
        lambda t: liu_schedule(0.4, 24, 8, "early", "linear")[t],
    ),
    "late": (
        {"schedule": "late", "start_value": 0.0, "end_value": 0.3, "until_step": 13},
        lambda t: liu_schedule(0.3, 24, 13, "late", "constant")[t],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rate_inside_the_model_follows_the_closed_form(tmp_path, case):
    schedule, closed_form = CASES[case]
    trainer, probe = fit(tmp_path, schedule)
    for site in MLP_SITES:
        seen = probe.rates(site)
        assert sorted(seen) == list(range(24)), "one training forward per step"
        for t, rate in seen.items():
            assert rate == pytest.approx(closed_form(t), abs=1e-12), f"{site} at step {t}"
    # The last value set is logged.
    assert trainer.state.metrics["dropout/p"] == pytest.approx(closed_form(23), abs=1e-12)


@pytest.mark.parametrize(
    ("schedule", "last_off", "first_on"),
    [
        ({"schedule": "early", "start_value": 0.2, "until_step": 11}, 10, 11),
        ({"schedule": "late", "start_value": 0.0, "end_value": 0.2, "until_step": 11}, 10, 11),
    ],
)
def test_early_and_late_dropout_switch_at_until_step(tmp_path, schedule, last_off, first_on):
    _, probe = fit(tmp_path, schedule)
    seen = probe.rates("net.3.p")
    before, after = seen[last_off], seen[first_on]
    if schedule["schedule"] == "early":
        assert (before, after) == (0.2, 0.0)
        assert all(seen[t] == 0.2 for t in range(11)) and all(seen[t] == 0 for t in range(11, 24))
    else:
        assert (before, after) == (0.0, 0.2)
        assert all(seen[t] == 0 for t in range(11)) and all(seen[t] == 0.2 for t in range(11, 24))


@pytest.mark.parametrize("cutoff", [1, 2, 6, 11])
def test_early_linear_is_liu_et_al_linspace(cutoff):
    """linspace(p, 0, C) reaches 0 at step C - 1 (0.1, 0.08, ..., 0.0 for C = 6), as in their code;
    a cutoff of 1 leaves linspace's single entry p."""
    cb = DropoutSchedule(
        schedule="early", early_mode="linear", start_value=0.1, end_value=0.0, until_step=cutoff
    )
    reference = liu_schedule(0.1, 20, cutoff, "early", "linear")
    assert [cb.rate(t, 20) for t in range(20)] == pytest.approx(reference.tolist(), abs=1e-15)


def test_interval_epoch_holds_the_rate_through_each_epoch(tmp_path):
    # 24 steps = 3 epochs; linear over the run in epochs: 0.3, 0.2, 0.1.
    schedule = {"schedule": "linear", "start_value": 0.3, "end_value": 0.0, "interval": "epoch"}
    _, probe = fit(tmp_path, schedule)
    by_epoch = probe.rates("net.3.p", by="epoch")
    assert by_epoch == pytest.approx({0: 0.3, 1: 0.2, 2: 0.1})
    by_step = probe.rates("net.3.p")
    for t, rate in by_step.items():
        assert rate == pytest.approx(0.3 - 0.1 * (t // STEPS_PER_EPOCH))


def test_interval_epoch_step_schedule_counts_epochs(tmp_path):
    schedule = {
        "schedule": "step",
        "start_value": 0.1,
        "milestones": [2],
        "values": [0.4],
        "interval": "epoch",
    }
    _, probe = fit(tmp_path, schedule)
    assert probe.rates("net.6.p", by="epoch") == {0: 0.1, 1: 0.1, 2: 0.4}


def test_transformer_attention_dropout_is_driven(tmp_path):
    schedule = {"schedule": "linear", "start_value": 0.3, "end_value": 0.0, "until_step": 12}
    trainer, probe = fit(tmp_path, schedule, model=TRANSFORMER_NODE, max_steps=16)
    sites = [f"blocks.{i}.attn.attn_dropout" for i in range(2)] + [
        "dropout.p",
        "blocks.0.attn.dropout.p",
        "blocks.1.mlp.dropout.p",
    ]
    for site in sites:
        seen = probe.rates(site)
        assert sorted(seen) == list(range(16))
        for t, rate in seen.items():
            assert rate == pytest.approx(max(0.3 - 0.025 * t, 0.0), abs=1e-12), (site, t)
    cb = trainer.callbacks[0]
    assert len(cb.targets) == 1 + 2 * 3  # the embedding dropout + attn_dropout, attn and mlp


def test_pattern_drives_only_the_matching_modules(tmp_path):
    schedule = {"schedule": "constant", "start_value": 0.4, "pattern": r"\.attn$"}
    trainer, probe = fit(tmp_path, schedule, model=TRANSFORMER_NODE, max_steps=4)
    assert trainer.callbacks[0].target_names == [
        "blocks.0.attn.attn_dropout",
        "blocks.1.attn.attn_dropout",
    ]
    for name, per_step in probe.seen.items():
        expected = 0.4 if name.endswith("attn.attn_dropout") else 0.05
        assert {r for rates in per_step.values() for r in rates} == {expected}, name
    for name, module in trainer.model.named_modules():
        if isinstance(module, nn.Dropout):
            assert module.p == 0.05, name


def test_pattern_on_mlp_dropouts_leaves_attention_alone(tmp_path):
    schedule = {"schedule": "constant", "start_value": 0.2, "pattern": "mlp"}
    trainer, probe = fit(tmp_path, schedule, model=TRANSFORMER_NODE, max_steps=2)
    assert trainer.callbacks[0].target_names == [
        "blocks.0.mlp.dropout.p",
        "blocks.1.mlp.dropout.p",
    ]
    assert probe.rates("blocks.0.mlp.dropout.p") == {0: 0.2, 1: 0.2}
    assert probe.rates("blocks.0.attn.attn_dropout") == {0: 0.05, 1: 0.05}
    assert probe.rates("blocks.1.attn.dropout.p") == {0: 0.05, 1: 0.05}


def test_include_attention_false_leaves_attn_dropout_alone(tmp_path):
    schedule = {"schedule": "constant", "start_value": 0.25, "include_attention": False}
    _, probe = fit(tmp_path, schedule, model=TRANSFORMER_NODE, max_steps=2)
    assert probe.rates("blocks.1.attn.attn_dropout") == {0: 0.05, 1: 0.05}
    assert probe.rates("blocks.1.attn.dropout.p") == {0: 0.25, 1: 0.25}


def test_pattern_matches_names_without_wrapper_parts():
    model = TransformerClassifier(input_shape=(4, 4), num_classes=3, dim=8, depth=2, heads=2)
    apply_activation_checkpointing(model)
    raw = [n for n, _ in model.named_modules()]
    assert "blocks.0._checkpoint_wrapped_module.attn" in raw

    class Compiled(nn.Module):  # what torch.compile's wrapper looks like to unwrap()
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    targets, names = find_targets(Compiled(model), r"^blocks\.0\.attn$", include_attention=True)
    assert names == ["blocks.0.attn.attn_dropout"]
    assert targets[0][0] is model.blocks[0]._checkpoint_wrapped_module.attn
    assert canonical_name("_orig_mod.blocks.1._checkpoint_wrapped_module.mlp.dropout") == (
        "blocks.1.mlp.dropout"
    )


def test_a_resumed_run_starts_at_the_rate_of_its_step():
    model = MLP(input_shape=(4,), num_classes=2, hidden=[8])
    state = TrainState(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_steps=100,
        steps_per_epoch=10,
        step=40,
        epoch=4,
    )
    cb = DropoutSchedule(schedule="linear", start_value=0.5, end_value=0.0)
    cb.on_fit_start(state)
    assert model.net[3].p == pytest.approx(0.3)
    assert state.unlogged["dropout/p"] == pytest.approx(0.3)
    epoch_cb = DropoutSchedule(schedule="linear", start_value=0.5, end_value=0.0, interval="epoch")
    epoch_cb.on_fit_start(state)
    assert model.net[3].p == pytest.approx(0.3)  # epoch 4 of 10
    epoch_cb.on_step_start(state)  # ignored with interval=epoch
    state.epoch = 5
    epoch_cb.on_epoch_start(state)
    assert model.net[3].p == pytest.approx(0.25)


def test_checkpoint_holds_the_definition_and_a_changed_one_is_named(recwarn):
    model = MLP(input_shape=(4,), num_classes=2, hidden=[8])
    state = TrainState(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_steps=100,
        steps_per_epoch=10,
        step=40,
    )
    saved = DropoutSchedule(schedule="early", start_value=0.2, until_step=50).state_dict()
    assert saved["definition"]["until_step"] == 50
    same = DropoutSchedule(schedule="early", start_value=0.2, until_step=50)
    same.load_state_dict(saved)
    same.on_fit_start(state)
    assert not recwarn.list
    changed = DropoutSchedule(schedule="early", start_value=0.2, until_step=30)
    changed.load_state_dict(saved)
    with pytest.warns(RuntimeWarning, match=r"had until_step=50; this run has until_step=30"):
        changed.on_fit_start(state)
    assert model.net[3].p == 0.0  # this run's schedule: step 40 is past its switch at 30


def test_no_matching_module_is_an_error():
    model = MLP(input_shape=(4,), num_classes=2, hidden=[8])
    state = TrainState(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_steps=10,
        steps_per_epoch=5,
    )
    with pytest.raises(ValueError, match=r"matches pattern 'attn'.*net\.2"):
        DropoutSchedule(pattern="attn").on_fit_start(state)
    plain = nn.Sequential(nn.Linear(4, 2))
    state.model = plain
    with pytest.raises(ValueError, match="no dropout module in the model"):
        DropoutSchedule().on_fit_start(state)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"schedule": "exponential"}, "schedule"),
        ({"start_value": 1.5}, "start_value"),
        ({"end_value": -0.1}, "end_value"),
        ({"until_step": 0}, "until_step"),
        ({"schedule": "step"}, "milestones"),
        ({"schedule": "step", "milestones": [3, 2], "values": [0.1, 0.2]}, "milestones"),
        ({"schedule": "step", "milestones": [3], "values": [0.1, 0.2]}, "values"),
        ({"schedule": "step", "milestones": [3], "values": [2.0]}, r"values\[0\]"),
        ({"milestones": [3], "values": [0.1]}, "milestones"),
        ({"schedule": "early"}, "until_step"),
        ({"schedule": "early", "until_step": 5, "start_value": 0.0}, "start_value"),
        ({"schedule": "late", "until_step": 5}, "end_value"),
        ({"early_mode": "cosine"}, "early_mode"),
        ({"interval": "batch"}, "interval"),
        ({"pattern": "("}, "pattern"),
        ({"include_attention": "no"}, "include_attention"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        DropoutSchedule(**kwargs)
