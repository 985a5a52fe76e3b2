"""EarlyStopping and DropoutSchedule on 2-rank gloo runs (CPU): DDP with an MLP, FSDP2 with the
TransformerClassifier. Each rank returns what it saw; the test compares the ranks with each other
and with the schedule's closed form.

Early stopping must be decided by each rank's own callback on the reduced metric (identical on
both ranks), not merely imposed by the loop's all-reduce of `should_stop`: both ranks report their
own stop at the same step with the same reason.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from tests.schedule_reference import liu_schedule
from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.callbacks.dropout_schedule import canonical_name
from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig
from trainer.distributed.env import DistEnv, distributed
from trainer.distributed.launch import launch
from trainer.distributed.parallelize import unwrap
from trainer.models.attention import SelfAttention

pytestmark = pytest.mark.distributed

WORLD = 2
CASES = ("ddp", "fsdp")


# ------------------------------------------------------------------------------ the ranks


def _config(case: str) -> TrainConfig:
    es_node: dict[str, Any] = {"_target_": "trainer.callbacks.early_stopping.EarlyStopping"}
    ds_node: dict[str, Any] = {"_target_": "trainer.callbacks.dropout_schedule.DropoutSchedule"}
    if case == "ddp":
        # Checks on train/loss (reduced over both ranks' batches) at log steps 2, 4, 6: the
        # first sets the best, min_delta=10 lets nothing improve on it, patience 2 -> step 6,
        # inside the first epoch (8 steps), so that no epoch's end makes the ranks agree.
        es_node.update(monitor="train/loss", check_on="step", min_delta=10.0, patience=2)
        # Only the first dropout module, named through DDP's `module.` prefix.
        ds_node.update(schedule="linear", start_value=0.4, end_value=0.0, pattern=r"^net\.3$")
        model = {"_target_": "trainer.models.MLP", "hidden": [16, 16], "dropout": 0.1}
        dataset_shape, strategy, epochs = [8], "ddp", 3
    else:
        # val/loss (summed over both ranks' shards) after epochs 0 and 1: the first sets the best,
        # the second cannot improve on it (min_delta=100): stop at step 16, restore epoch 0.
        es_node.update(monitor="val/loss", min_delta=100.0, patience=1, restore_best_weights=True)
        ds_node.update(schedule="early", start_value=0.3, until_step=6, early_mode="linear")
        model = {
            "_target_": "trainer.models.TransformerClassifier",
            "dim": 16,
            "depth": 2,
            "heads": 2,
        }
        dataset_shape, strategy, epochs = [4, 4], "fsdp", 4
    return TrainConfig(
        data=DataConfig(
            dataset={
                "_target_": "trainer.data.datasets.synthetic",
                "num_samples": 320,  # 256 train: 128 per rank, 8 steps of 16
                "input_shape": dataset_shape,
                "num_classes": 4,
            },
            batch_size=16,
            eval_batch_size=64,
        ),
        model=model,
        optim={"_target_": "torch.optim.AdamW", "lr": 1e-2},
        schedule=None,
        parallel=ParallelConfig(strategy=strategy, backend="gloo", timeout_s=60),
        callbacks={"dropout": ds_node, "es": es_node},
        logger={},
        checkpoint=CheckpointConfig(save_final=False),
        device="cpu",
        max_epochs=epochs,
        log_every_steps=2,
        test_after_fit=False,
    )


def _local(value: torch.Tensor) -> torch.Tensor:
    """This rank's part of a state-dict entry (a DTensor's local shard under FSDP2)."""
    to_local = getattr(value, "to_local", None)
    return (to_local() if to_local is not None else value).detach().clone()


class Probe(Callback):
    """Placed after the callbacks under test: the step, the checks EarlyStopping saw, the weights
    at each validation, and (through forward pre-hooks) the rates in the model."""

    def __init__(self, model: nn.Module, es: Any) -> None:
        self.step = -1
        self.es = es
        self.rates: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.checks: list[tuple[int, float]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        for name, module in unwrap(model).named_modules():
            attr = "p" if isinstance(module, nn.Dropout) else None
            attr = "attn_dropout" if isinstance(module, SelfAttention) else attr
            if attr:
                module.register_forward_pre_hook(self._hook(f"{canonical_name(name)}.{attr}"))

    def _hook(self, site: str):
        attr = site.rsplit(".", 1)[1]

        def read(module: nn.Module, args: Any) -> None:
            if module.training:
                self.rates[site][self.step].append(getattr(module, attr))

        return read

    def on_step_start(self, state: Any) -> None:
        self.step = state.step

    def on_step_end(self, state: Any) -> None:
        if self.es.check_on == "step" and self.es.monitor in state.unlogged:
            self.checks.append((state.step, state.metrics[self.es.monitor]))

    def on_eval_end(self, state: Any) -> None:
        if self.es.check_on == "eval":
            self.checks.append((state.step, state.metrics[self.es.monitor]))
            sd = get_model_state_dict(state.model)
            self.weights[state.step] = {k: _local(v) for k, v in sd.items()}


def _run_case(case: str, env: DistEnv, run_dir: Path) -> dict[str, Any]:
    trainer, _ = build_trainer(_config(case), env, run_dir)
    schedule, es = trainer.callbacks
    probe = Probe(trainer.model, es)
    trainer.callbacks.append(probe)
    state = trainer.fit()
    final = {k: _local(v) for k, v in get_model_state_dict(trainer.model).items()}
    steps = sorted(probe.weights)

    def same(step: int) -> bool:
        return all(torch.equal(final[k], probe.weights[step][k]) for k in final)

    return {
        "rank": env.rank,
        "step": state.step,
        "max_steps": state.max_steps,
        "stop_reason": state.stop_reason,
        "es_state": es.state_dict(),
        "es_best_step": es.best_step,
        "checks": probe.checks,
        "rates": {site: dict(by_step) for site, by_step in probe.rates.items()},  # picklable
        "targets": schedule.target_names,
        "eval_steps": steps,
        "final_equals": {s: same(s) for s in steps},
        "wrapper": type(trainer.model).__name__,
    }


def _worker(out_dir: str) -> dict[str, dict[str, Any]]:
    """One rank: both cases in turn in one process group (one start-up for both)."""
    with distributed("cpu", "gloo", 60) as env:
        return {
            case: _run_case(case, env, Path(out_dir) / f"{case}_run{env.rank}") for case in CASES
        }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Both cases on two ranks; {case: [rank 0's result, rank 1's]}. A failing rank raises
    ChildFailedError here, with its traceback."""
    by_rank = launch(_worker, WORLD, str(tmp_path_factory.mktemp("ranks")))
    return {case: [by_rank[r][case] for r in range(WORLD)] for case in CASES}


def assert_rates(result: dict[str, Any], site: str, closed_form: Any, steps: int) -> None:
    seen = result["rates"][site]
    assert sorted(seen) == list(range(steps)), site
    for t, rates in seen.items():
        expected = closed_form(t)
        assert rates and all(r == pytest.approx(expected, abs=1e-12) for r in rates), (
            f"rank {result['rank']} {site} step {t}: {rates} != {expected}"
        )


# ------------------------------------------------------------------------------ the tests


@pytest.mark.timeout(120)
def test_ddp_ranks_stop_together_on_the_reduced_train_loss(results):
    r0, r1 = results["ddp"]
    for r in (r0, r1):
        assert r["wrapper"] == "DistributedDataParallel"
        assert r["step"] == 6 < r["max_steps"]
        assert r["stop_reason"].startswith("early stopping at step 6: train/loss did not improve")
        assert r["es_state"]["stopped_step"] == 6 and r["es_state"]["wait_count"] == 2
        assert [s for s, _ in r["checks"]] == [2, 4, 6]
        # The pattern saw the name without DDP's `module.` prefix: one module driven.
        assert r["targets"] == ["net.3.p"]
        T = r["max_steps"]
        assert_rates(r, "net.3.p", lambda t, T=T: 0.4 - 0.4 * t / T, r["step"])
        assert_rates(r, "net.6.p", lambda t: 0.1, r["step"])  # untouched
    # The metric behind the decision is the reduced one: bit-identical on both ranks.
    assert r0["checks"] == r1["checks"]
    assert r0["stop_reason"] == r1["stop_reason"]
    assert r0["es_state"] == r1["es_state"]


@pytest.mark.timeout(120)
def test_fsdp_transformer_schedule_stop_and_restore_best_weights(results):
    r0, r1 = results["fsdp"]
    for r in (r0, r1):
        assert r["wrapper"].startswith("FSDP")
        assert r["step"] == 16 < r["max_steps"]
        assert "val/loss did not improve" in r["stop_reason"]
        assert r["eval_steps"] == [8, 16]
        assert r["es_best_step"] == 8
        # The weights in the model after the fit are this rank's shards of the epoch-0 weights.
        assert r["final_equals"] == {8: True, 16: False}
        early = lambda t: liu_schedule(0.3, 16, 6, "early", "linear")[t]  # noqa: E731
        sites = [f"blocks.{i}.attn.attn_dropout" for i in range(2)]
        sites += ["dropout.p", "blocks.0.attn.dropout.p", "blocks.1.mlp.dropout.p"]
        for site in sites:
            assert_rates(r, site, early, r["step"])
        assert len(r["targets"]) == 7
    assert r0["checks"] == r1["checks"] and len(r0["checks"]) == 2
    assert math.isfinite(r0["checks"][0][1])
    assert r0["stop_reason"] == r1["stop_reason"] and r0["es_state"] == r1["es_state"]


# ------------------------------------------------------------------------------ stop agreement


class OnRank(Callback):
    """On `rank` only, before step `at` + 1 (`signal`) or after step `at` (a stop request)."""

    def __init__(self, trainer: Any, rank: int, at: int, signal: bool) -> None:
        self.trainer, self.rank, self.at, self.signal = trainer, rank, at, signal

    def on_step_start(self, state: Any) -> None:
        if self.signal and state.rank == self.rank and state.step == self.at:
            self.trainer.preempted_by = "SIGTERM"  # what the signal handler records

    def on_step_end(self, state: Any) -> None:
        if not self.signal and state.rank == self.rank and state.step == self.at:
            state.request_stop(f"rank {self.rank} at step {self.at}")


def _stop_worker(out_dir: str) -> dict[str, tuple[int, str, list[str]]]:
    """Per case: the step this rank stopped at, its reason, and the checkpoints in the run."""
    from tests.helpers import make_config

    seen = {}
    with distributed("cpu", "gloo", 60) as env:
        for case, asks, log_every_steps in (
            ("request 3", [(1, 3, False)], 4),
            ("request 4", [(1, 4, False)], 4),
            ("signal", [(1, 9, True)], 4),
            ("stop, then signal", [(0, 2, False), (1, 3, True)], 1),
        ):
            # 32 steps an epoch, so that no epoch's end (where ranks also agree) comes first.
            cfg = make_config(
                dataset={"num_samples": 2560},
                parallel=ParallelConfig(strategy="ddp", backend="gloo", timeout_s=60),
                max_steps=10,
                log_every_steps=log_every_steps,
            )
            run_dir = Path(out_dir) / case.replace(" ", "_").replace(",", "")
            trainer, _ = build_trainer(cfg, env, run_dir)
            trainer.callbacks += [OnRank(trainer, *ask) for ask in asks]
            state = trainer.fit()
            saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
            seen[case] = (state.step, state.stop_reason, saved)
    return seen


@pytest.mark.timeout(120)
def test_a_stop_asked_on_one_rank_lands_on_both_after_the_next_log_step(tmp_path):
    """The stop flags go out in a log step's all-reduce, before its on_step_end, and the ranks
    read it back one step later: a stop asked for in step 3 lands after step 5 (log step 4's
    all-reduce); one asked for in log step 4's `on_step_end`, after its flags went out, lands
    after step 9. A signal on one rank just before the last step (10, a log step, inside the
    epoch, whose all-reduce is read at once) makes both ranks force the final checkpoint
    (save_final=false), not one alone. So does one that goes out in the all-reduce still in
    flight when the ranks stop (logging every step: rank 0's stop request goes out with step 3,
    read in step 4, which carries rank 1's signal; it is read after the loop)."""
    results = launch(_stop_worker, WORLD, str(tmp_path))
    r0, r1 = results[0], results[1]
    other = "another rank requested a stop"
    assert r1["request 3"][:2] == (5, "rank 1 at step 3") and r0["request 3"][:2] == (5, other)
    assert r1["request 4"][:2] == (9, "rank 1 at step 4") and r0["request 4"][:2] == (9, other)
    assert r1["signal"][:2] == (10, "received SIGTERM: saved a checkpoint and stopped")
    assert r0["signal"][:2] == (10, other)
    assert r0["stop, then signal"][:2] == (4, "rank 0 at step 2")
    assert r1["stop, then signal"][:2] == (4, "received SIGTERM: saved a checkpoint and stopped")
    for r in (r0, r1):
        assert r["request 3"][2] == [] and r["signal"][2] == ["step_00000010"]
        assert r["stop, then signal"][2] == ["step_00000004"]
