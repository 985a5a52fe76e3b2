"""The `nonfinite` policy (raise | skip | stop) against a real NaN in the model's input.

The NaN is injected by `tests.faults.NaNInput`, a callback that installs a forward pre-hook and
writes NaN into the first sample of the chosen training steps: the loss, the gradients and the
global gradient norm all become NaN, exactly as with a corrupt sample. Each test adds its row to
the fault table (see tests/faults.py and docs/faults.md).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.*

from tests.faults import NaNInput, WeightWatch, snapshot  # noqa: E402
from tests.helpers import make_config, make_trainer  # noqa: E402
from trainer.callbacks.base import Callback  # noqa: E402
from trainer.checkpoint import TRAINER_STATE, verify  # noqa: E402
from trainer.config import ParallelConfig  # noqa: E402
from trainer.distributed.env import DistEnv, distributed  # noqa: E402
from trainer.distributed.launch import launch  # noqa: E402

MAX_STEPS = 12  # 8 steps per epoch (256 samples, batch 32): the run crosses an epoch boundary


def run(tmp_path: Path, policy: str, nan_steps: list[int], **overrides: Any):
    nan, watch = NaNInput(nan_steps), WeightWatch()
    trainer = make_trainer(
        tmp_path,
        callbacks=[nan, watch],
        nonfinite=policy,
        max_steps=overrides.pop("max_steps", MAX_STEPS),
        **overrides,
    )
    return trainer, nan, watch


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())


# ------------------------------------------------------------------------------- raise


def test_raise_names_the_step(tmp_path, record_fault):
    trainer, nan, watch = run(tmp_path, "raise", [5])
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 5 \(") as err:
        trainer.fit()
    assert nan.injected == [5]
    assert trainer.state.step == 4  # step 5 never completed
    assert watch.changed == [1, 2, 3, 4]
    assert all_finite(trainer.model)  # the NaN gradients were never applied
    record_fault(
        "NaN loss, nonfinite=raise",
        "callback `NaNInput`: forward pre-hook writes NaN into one input sample of step 5",
        f"FloatingPointError {str(err.value)!r}; weights untouched (all finite)",
    )


# ------------------------------------------------------------------------------- skip


def test_skip_leaves_the_step_out_and_goes_on(tmp_path, record_fault):
    trainer, nan, watch = run(tmp_path, "skip", [5])
    trainer.fit()
    assert nan.injected == [5]
    assert trainer.state.step == MAX_STEPS
    # Step 5 changed nothing (bit-identical weights across it); every other step did.
    assert watch.unchanged == [5]
    assert watch.changed == [s for s in range(1, MAX_STEPS + 1) if s != 5]
    assert trainer.skipped_steps == 1
    assert trainer.state.metrics["train/skipped_steps"] == 1
    assert all_finite(trainer.model)
    record_fault(
        "NaN loss, nonfinite=skip",
        "`NaNInput` at step 5 of 12",
        "step 5 skipped: weights bit-identical before and after it, every other step changed "
        f"them; run finished all {MAX_STEPS} steps with finite weights; train/skipped_steps=1",
    )


def test_skip_momentum_state_untouched_by_skipped_step(tmp_path):
    """A skipped step leaves the optimizer state alone too (momentum buffers unchanged)."""
    nan, watch = NaNInput([3]), WeightWatch()

    class Momentum(Callback):
        def on_step_start(self, state):
            self.buffers = [s["momentum_buffer"].clone() for s in state.optimizer.state.values()]

        def on_step_end(self, state):
            if state.step == 3:
                after = [s["momentum_buffer"] for s in state.optimizer.state.values()]
                self.same = all(torch.equal(a, b) for a, b in zip(after, self.buffers, strict=True))

    momentum = Momentum()
    trainer = make_trainer(
        tmp_path, callbacks=[nan, watch, momentum], nonfinite="skip", max_steps=4
    )
    trainer.fit()
    assert watch.unchanged == [3] and momentum.same


def test_more_than_max_consecutive_skips_raises(tmp_path, record_fault):
    # Two NaN steps in a row are tolerated (max_consecutive_skips=2), the count starts again
    # after a good step; a third in a row is not.
    trainer, nan, watch = run(
        tmp_path, "skip", [2, 3, 5, 6, 7], max_consecutive_skips=2, max_steps=MAX_STEPS
    )
    with pytest.raises(FloatingPointError, match=r"at step 7 .*3 steps in a row skipped") as err:
        trainer.fit()
    assert watch.unchanged == [2, 3, 5, 6]
    assert watch.changed == [1, 4]
    assert trainer.skipped_steps == 5
    record_fault(
        "NaN loss on consecutive steps, nonfinite=skip",
        "`NaNInput` at steps 2, 3, 5, 6, 7 with max_consecutive_skips=2",
        f"steps 2, 3, 5, 6 skipped, then FloatingPointError {str(err.value)!r}",
    )


# ------------------------------------------------------------------------------- stop


def test_stop_saves_a_checkpoint_at_that_step(tmp_path, record_fault):
    # No periodic and no final checkpoint: the one written is the stop's own.
    trainer, nan, watch = run(
        tmp_path, "stop", [5], checkpoint={"every_steps": 0, "save_final": False}
    )
    trainer.fit()
    state = trainer.state
    assert state.step == 5 and state.should_stop
    assert "step 5" in state.stop_reason and "nonfinite=stop" in state.stop_reason
    assert watch.unchanged == [5]
    folder = tmp_path / "checkpoints" / "step_00000005"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [folder.name]
    assert verify(folder)["step"] == 5
    saved = torch.load(folder / TRAINER_STATE, weights_only=True)
    assert saved["state"]["step"] == 5
    # The checkpoint holds the last good weights (step 5's update was not applied).
    weights = {k: torch.zeros_like(v) for k, v in trainer.model.state_dict().items()}
    dcp.load({"model": weights}, checkpoint_id=folder)
    for name, value in weights.items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
    assert all_finite(trainer.model)
    record_fault(
        "NaN loss, nonfinite=stop",
        "`NaNInput` at step 5, checkpoint.every_steps=0 and save_final=false",
        f"stopped after step 5 with stop_reason {state.stop_reason!r}; checkpoint "
        "step_00000005 (the only one) verified, holding the last finite weights",
    )


# ------------------------------------------------------------------------------- two ranks


def _two_rank_worker(env: DistEnv, run_dir: str, policy: str) -> dict[str, Any]:
    """One fit with a NaN at step 5 on rank 1 only; called inside the process group."""
    from trainer.build import build_trainer

    cfg = make_config(
        parallel=ParallelConfig(strategy="ddp", backend="gloo", timeout_s=60),
        nonfinite=policy,
        max_steps=MAX_STEPS,
        checkpoint={"every_steps": 0, "save_final": False},
        log_every_steps=4,  # step 5 is no log step: nonfinite=stop needs no agreement to stop
    )
    trainer, _ = build_trainer(cfg, env, Path(run_dir) / policy)
    nan, watch = NaNInput([5], rank=1), WeightWatch()
    trainer.callbacks += [nan, watch]
    trainer.fit()
    return {
        "injected": nan.injected,
        "unchanged": watch.unchanged,
        "step": trainer.state.step,
        "stop_reason": trainer.state.stop_reason,
        "skipped": trainer.skipped_steps,
        "weights": snapshot(trainer.model),
        "checkpoints": sorted(
            p.name for p in (Path(run_dir) / policy / "checkpoints").glob("step_*")
        ),
    }


def _both_policies(run_dir: str) -> dict[str, dict[str, Any]]:
    # One process group for both fits: a default group is initialised once per process.
    with distributed("cpu", "gloo", 60) as env, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {policy: _two_rank_worker(env, run_dir, policy) for policy in ("skip", "stop")}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_nan_on_one_rank_both_ranks_decide_alike(tmp_path, record_fault):
    results = launch(_both_policies, 2, str(tmp_path))
    skip = {r: results[r]["skip"] for r in (0, 1)}
    stop = {r: results[r]["stop"] for r in (0, 1)}
    assert skip[0]["injected"] == [] and skip[1]["injected"] == [5]  # only rank 1 saw the NaN
    for rank in (0, 1):
        assert skip[rank]["unchanged"] == [5], rank  # both skipped step 5...
        assert skip[rank]["step"] == MAX_STEPS and skip[rank]["skipped"] == 1, rank
        assert stop[rank]["step"] == 5 and stop[rank]["unchanged"] == [5], rank  # ...or stopped
        assert stop[rank]["checkpoints"] == ["step_00000005"], rank
    for name, value in skip[0]["weights"].items():  # and stayed replicas of each other
        assert torch.equal(skip[1]["weights"][name], value), name
        assert torch.isfinite(value).all(), name
    assert "step 5" in stop[0]["stop_reason"] and "step 5" in stop[1]["stop_reason"]
    record_fault(
        "NaN on one rank of two",
        "`NaNInput(rank=1)` at step 5; DDP over gloo, 2 ranks via `launch`; once with "
        "nonfinite=skip, once with nonfinite=stop",
        "skip: both ranks skipped step 5 and finished 12 steps with bit-identical finite "
        "weights; stop: both stopped after step 5 with one checkpoint step_00000005",
    )
