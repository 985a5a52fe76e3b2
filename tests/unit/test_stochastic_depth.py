"""Stochastic depth: `DropPath` on the transformer blocks' residual branches, its per-block rates,
and `StochasticDepthSchedule` (early and late stochastic depth, Liu et al. 2023).

References are computed here: the block without drop-path written out from its own submodules,
the per-block rule as numpy's ``linspace(0, r, depth)``, and Liu et al.'s per-iteration schedule
rebuilt with numpy (`tests/schedule_reference.py`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import ADAMW, assert_same_weights, make_trainer
from tests.schedule_reference import liu_schedule
from trainer.callbacks.base import Callback
from trainer.callbacks.stochastic_depth import StochasticDepthSchedule
from trainer.models import TinyGPT, TransformerClassifier
from trainer.models.attention import TransformerBlock
from trainer.models.drop_path import DropPath
from trainer.state import TrainState

DEPTH = 3
# 8 steps of 32 per epoch on the helpers' synthetic data (256 training samples of shape (8,)).
MODEL = {
    "_target_": "trainer.models.TransformerClassifier",
    "dim": 16,
    "depth": DEPTH,
    "heads": 2,
    "drop_path": 0.2,
}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def block_without_drop_path(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    x = x + block.attn(block.norm1(x))
    return x + block.mlp(block.norm2(x))


def models(drop_path: float, rule: str = "linear") -> list[nn.Module]:
    """Both transformer models, built from the same seed."""
    kwargs = {"dim": 16, "depth": 4, "heads": 2, "drop_path": drop_path, "drop_path_rule": rule}
    torch.manual_seed(0)
    return [
        TransformerClassifier(input_shape=(1, 8, 8), num_classes=5, **kwargs),
        TinyGPT(input_shape=(8,), num_classes=11, **kwargs),
    ]


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize(("p", "mode"), [(0.0, "train"), (0.5, "eval")])
def test_drop_path_is_the_identity_in_eval_and_at_zero(p, mode):
    block = TransformerBlock(16, 2, drop_path=p).train(mode == "train")
    x = torch.randn(6, 5, 16)
    assert torch.equal(block(x), block_without_drop_path(block, x))


def test_drop_path_adds_no_parameters_and_draws_nothing_at_build():
    for with_it, without in zip(models(0.3), models(0.0), strict=True):
        assert_same_weights(with_it, without)  # same seed, same init: nothing drawn in between
        x = torch.randint(0, 5, (3, 8)) if isinstance(with_it, TinyGPT) else torch.randn(3, 1, 8, 8)
        assert torch.equal(with_it.eval()(x), without.eval()(x))


def test_drop_path_keeps_the_expected_value_and_drops_whole_samples():
    p, n = 0.3, 200_000
    drop = DropPath(p).train()
    x = torch.rand(n, 2, 3) + 0.5
    y = drop(x)
    kept = (y != 0).all(dim=(1, 2))
    assert torch.equal(kept, (y != 0).any(dim=(1, 2)))  # a sample is dropped whole or not at all
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    # The kept fraction is Binomial(n, 1 - p) / n: within 5 standard deviations.
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    assert abs(y.mean().item() - x.mean().item()) < 5 * sigma * x.mean().item()


def test_drop_path_changes_the_training_output():
    model = models(0.5)[0].train()
    x = torch.randn(8, 1, 8, 8)
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(("rule", "depth"), [("linear", 4), ("constant", 4), ("linear", 1)])
def test_block_rates_follow_the_rule(rule, depth):
    model = TinyGPT(input_shape=(8,), num_classes=11, dim=8, depth=depth, heads=2, drop_path=0.3, drop_path_rule=rule)  # fmt: skip
    rates = [block.drop_path.p for block in model.blocks]
    # torch.linspace(0, r, 1) is [0]: a single block under the linear rule never drops.
    expected = np.linspace(0, 0.3, depth) if rule == "linear" else np.full(depth, 0.3)
    assert rates == pytest.approx(expected.tolist(), abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop_path": 1.0}, r"drop_path must be a drop-path rate in \[0, 1\)"),
        ({"drop_path": -0.1}, "drop_path must be"),
        ({"drop_path_rule": "cosine"}, "drop_path_rule must be one of constant, linear"),
    ],
)
def test_bad_drop_path_arguments_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerClassifier(input_shape=(8,), num_classes=2, dim=8, heads=2, **kwargs)


# ----------------------------------------------------------------------------- the schedule


class DropPathProbe(Callback):
    """Records, per step, the rate each block's DropPath reads in its training forwards."""

    def __init__(self, model: nn.Module) -> None:
        self.step = -1
        self.seen: dict[int, dict[int, set[float]]] = defaultdict(lambda: defaultdict(set))
        drops = [m for m in model.modules() if isinstance(m, DropPath)]
        for i, module in enumerate(drops):
            module.register_forward_pre_hook(self._hook(i))

    def _hook(self, block: int):
        def read(module: nn.Module, args: Any) -> None:
            if module.training:
                self.seen[self.step][block].add(module.p)

        return read

    def on_step_start(self, state: TrainState) -> None:
        self.step = state.step

    def rates(self) -> dict[int, list[float]]:
        out = {}
        for step, blocks in self.seen.items():
            assert all(len(v) == 1 for v in blocks.values()), f"a rate changed in step {step}"
            out[step] = [next(iter(blocks[i])) for i in sorted(blocks)]
        return out


class CrashBefore(Callback):
    def __init__(self, step: int | None) -> None:
        self.at = step

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.at:
            raise RuntimeError(f"simulated crash before step {self.at}")


def fit_with_schedule(
    run_dir: Path, schedule: dict[str, Any], *, crash: int | None = None, **overrides: Any
):
    """A trainer for 16 steps of a 3-block transformer with `schedule`, a probe after it (it sees
    the schedule's rates) and a crash before step `crash`."""
    trainer = make_trainer(
        run_dir,
        model=MODEL,
        optim=ADAMW,
        max_steps=16,
        callbacks=[StochasticDepthSchedule(**schedule), CrashBefore(crash)],
        **overrides,
    )
    probe = DropPathProbe(trainer.model)
    trainer.callbacks.append(probe)
    return trainer, probe


EARLY_LINEAR = {"schedule": "early", "early_mode": "linear", "start_value": 0.2, "until_step": 6}
LATE = {"schedule": "late", "start_value": 0.0, "end_value": 0.2, "until_step": 9}


@pytest.mark.parametrize(
    ("schedule", "mode", "form"),
    [(EARLY_LINEAR, "early", "linear"), (LATE, "late", "constant")],
    ids=["early-linear", "late"],
)
def test_rates_per_step_and_block_follow_liu_et_al(tmp_path, schedule, mode, form):
    trainer, probe = fit_with_schedule(tmp_path, schedule)
    trainer.fit()
    model_rate = liu_schedule(0.2, 16, schedule["until_step"], mode, form)
    share = np.linspace(0, 1, DEPTH)  # Liu et al. re-spread the rate: linspace(0, r(t), depth)
    seen = probe.rates()
    assert sorted(seen) == list(range(16))
    for t, rates in seen.items():
        assert rates == pytest.approx((model_rate[t] * share).tolist(), abs=1e-12), t
    assert trainer.state.metrics["drop_path/rate"] == pytest.approx(model_rate[15])


def test_a_resumed_run_has_the_same_rates_and_weights(tmp_path):
    straight, straight_probe = fit_with_schedule(tmp_path / "straight", EARLY_LINEAR)
    straight.fit()
    run_dir = tmp_path / "interrupted"
    ckpt = {"every_steps": 4}
    crashed, _ = fit_with_schedule(run_dir, EARLY_LINEAR, crash=5, checkpoint=ckpt)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed, resumed_probe = fit_with_schedule(
        run_dir, EARLY_LINEAR, checkpoint=ckpt, resume="auto"
    )
    resumed.fit()
    want = straight_probe.rates()
    assert resumed_probe.rates() == {t: want[t] for t in range(4, 16)}
    # The drop-path masks come from the restored generator: the same weights bit for bit.
    assert_same_weights(resumed.model, straight.model)


def test_the_schedule_needs_drop_path_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    state = TrainState(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_steps=10,
        steps_per_epoch=5,
    )
    with pytest.raises(ValueError, match="no DropPath module .*in the model"):
        StochasticDepthSchedule().on_fit_start(state)


def test_schedule_rates_must_leave_something_to_rescale():
    with pytest.raises(ValueError, match=r"start_value must be a drop-path rate in \[0, 1\)"):
        StochasticDepthSchedule(start_value=1.0)
