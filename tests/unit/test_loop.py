"""The training loop (`trainer.loop.Trainer`) against references computed in each test: a plain
PyTorch loop drawing the same batches, `clip_grad_norm_`, sums over a whole split by hand."""

from __future__ import annotations

import copy
import gc
import math
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.helpers

from tests.helpers import (  # noqa: E402
    ADAMW,
    CONSTANT,
    SGD,
    StepLosses,
    assert_same_weights,
    clone_model,
    epoch_batches,
    make_trainer,
    max_weight_diff,
    reference_fit,
)
from trainer.callbacks.base import HOOKS, Callback  # noqa: E402
from trainer.checkpoint import TRAINER_STATE, verify  # noqa: E402
from trainer.state import TrainState  # noqa: E402

PLAIN_SGD = {"_target_": "torch.optim.SGD", "lr": 0.1}


def _optimizer_like(node: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    cls = getattr(torch.optim, node["_target_"].rsplit(".", 1)[1])
    return cls(model.parameters(), **kwargs)


class Recorder(Callback):
    """Records every hook with the step and epoch it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.errors: list[BaseException] = []

    def _record(self, name: str, state: TrainState) -> None:
        self.calls.append((name, state.step, state.epoch))

    def on_fit_start(self, state: TrainState) -> None:
        self._record("on_fit_start", state)

    def on_epoch_start(self, state: TrainState) -> None:
        self._record("on_epoch_start", state)

    def on_step_start(self, state: TrainState) -> None:
        self._record("on_step_start", state)

    def on_step_end(self, state: TrainState) -> None:
        self._record("on_step_end", state)

    def on_eval_end(self, state: TrainState) -> None:
        self._record("on_eval_end", state)

    def on_epoch_end(self, state: TrainState) -> None:
        self._record("on_epoch_end", state)

    def on_fit_end(self, state: TrainState) -> None:
        self._record("on_fit_end", state)

    def on_exception(self, state: TrainState, error: BaseException) -> None:
        self.calls.append(("on_exception", state.step, state.epoch))
        self.errors.append(error)

    @property
    def hooks(self) -> list[str]:
        return [name for name, _, _ in self.calls]


# ------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("optim", [SGD, ADAMW], ids=["sgd_momentum", "adamw"])
@pytest.mark.parametrize("schedule", [CONSTANT, None], ids=["constant", "no_schedule"])
def test_matches_plain_loop(tmp_path, optim, schedule):
    trainer = make_trainer(tmp_path, optim=optim, schedule=schedule, max_epochs=2)
    reference = clone_model(trainer)
    assert_same_weights(reference, trainer.model)
    ref_opt = _optimizer_like(optim, reference)

    state = trainer.fit()
    ref_losses = reference_fit(
        reference, ref_opt, trainer.train_loader.dataset, batch_size=32, epochs=2, seed=0
    )

    assert state.step == len(ref_losses) == 2 * 8
    assert_same_weights(reference, trainer.model, atol=1e-6)
    # The run really trained: far from where it started (a fresh build gives the same init).
    fresh = make_trainer(tmp_path / "fresh", optim=optim, schedule=schedule)
    assert max_weight_diff(fresh.model, trainer.model) > 1e-2


def test_shuffle_changes_order_every_epoch(tmp_path):
    """Shuffle on: each epoch draws a new permutation (the loop calls set_epoch), and the reference
    built from DistributedSampler with set_epoch(epoch) reproduces it batch for batch."""
    seen: list[torch.Tensor] = []

    def record(module, args):
        if module.training:  # skip the validation forwards
            seen.append(args[0].detach().clone())

    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.model.register_forward_pre_hook(record)
    trainer.fit()
    expected = [
        x for e in range(2) for x, _ in epoch_batches(trainer.train_loader.dataset, 32, e, 0, True)
    ]
    assert len(seen) == len(expected) == 16
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(torch.cat(seen[:8]).sum(1), torch.cat(seen[8:]).sum(1))


# ------------------------------------------------------------------------------- accumulation


def test_grad_accumulation_equals_large_batch(tmp_path):
    common = {"optim": PLAIN_SGD, "max_epochs": 2}
    accum = make_trainer(
        tmp_path / "a", data={"batch_size": 8, "shuffle": False}, grad_accum_steps=4, **common
    )
    large = make_trainer(
        tmp_path / "b", data={"batch_size": 32, "shuffle": False}, grad_accum_steps=1, **common
    )
    assert_same_weights(accum.model, large.model)
    start = clone_model(large)

    accum.fit()
    large.fit()

    assert accum.state.step == large.state.step == 2 * 8
    assert accum.state.samples_seen == large.state.samples_seen == 2 * 256
    assert max_weight_diff(start, large.model) > 1e-2
    assert_same_weights(accum.model, large.model, atol=1e-5)


def test_grad_accumulation_weights_samples_not_micro_batches(tmp_path):
    """drop_last=False: 250 samples in micro-batches of 8 end with a batch of 2, so the last group
    of 4 holds 8 + 8 + 8 + 2 samples. Its step must equal one step on those 26 samples (the mean
    over samples), as grad_accum_steps=1 with batch 32 does on the same data order."""
    common = {"optim": PLAIN_SGD, "max_epochs": 1, "dataset": {"num_samples": 312}}
    accum = make_trainer(
        tmp_path / "a",
        data={"batch_size": 8, "shuffle": False, "drop_last": False},
        grad_accum_steps=4,
        **common,
    )
    large = make_trainer(
        tmp_path / "b",
        data={"batch_size": 32, "shuffle": False, "drop_last": False},
        grad_accum_steps=1,
        **common,
    )
    assert len(accum.train_loader.dataset) == 250
    assert len(accum.train_loader) == 32 and len(large.train_loader) == 8

    accum.fit()
    large.fit()

    assert accum.state.step == large.state.step == 8
    assert accum.state.samples_seen == large.state.samples_seen == 250
    assert_same_weights(accum.model, large.model, atol=1e-5)


def test_grad_accumulation_short_last_group(tmp_path):
    """32 micro-batches of 8 in groups of 3: ten steps of 24 samples and a last one of 16."""
    trainer = make_trainer(
        tmp_path, optim=PLAIN_SGD, data={"batch_size": 8}, grad_accum_steps=3, max_epochs=1
    )
    reference = clone_model(trainer)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    trainer.fit()

    micro = list(epoch_batches(trainer.train_loader.dataset, 8, 0, 0, True))
    groups = [micro[i : i + 3] for i in range(0, len(micro), 3)]
    for group in groups:
        x = torch.cat([b[0] for b in group])
        y = torch.cat([b[1] for b in group])
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()

    assert trainer.state.step == len(groups) == 11
    assert_same_weights(reference, trainer.model, atol=1e-5)


# ------------------------------------------------------------------------------- clipping


def test_grad_clip_matches_clip_grad_norm(tmp_path):
    clip = 0.05
    trainer = make_trainer(tmp_path, optim=SGD, grad_clip=clip, max_epochs=2)
    reference = clone_model(trainer)
    unclipped = clone_model(trainer)
    dataset = trainer.train_loader.dataset

    # Clipping is active: the first step's gradient norm is far above the limit.
    x, y = next(epoch_batches(dataset, 32, 0, 0, True))
    F.cross_entropy(unclipped(x), y).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in unclipped.parameters()])
    assert norm > 5 * clip
    unclipped.zero_grad(set_to_none=True)

    trainer.fit()
    ref_opt = _optimizer_like(SGD, reference)
    reference_fit(reference, ref_opt, dataset, batch_size=32, epochs=2, seed=0, grad_clip=clip)
    reference_fit(
        unclipped, _optimizer_like(SGD, unclipped), dataset, batch_size=32, epochs=2, seed=0
    )

    assert_same_weights(reference, trainer.model, atol=1e-6)
    assert max_weight_diff(unclipped, trainer.model) > 1e-3


# ------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("max_steps", [5, 11])
def test_max_steps_stops_mid_epoch(tmp_path, max_steps):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=max_steps, max_epochs=10, callbacks=[recorder])
    assert trainer.batches_per_epoch == 8
    state = trainer.fit()

    assert state.step == max_steps
    assert state.epoch == max_steps // 8  # the open epoch, not incremented
    assert state.batches_in_epoch == max_steps % 8
    assert state.samples_seen == max_steps * 32
    assert recorder.hooks.count("on_step_start") == max_steps
    assert recorder.hooks.count("on_epoch_end") == max_steps // 8
    assert recorder.hooks[-1] == "on_fit_end"
    assert state.stop_reason == ""


def test_max_epochs_counts_steps_with_accumulation(tmp_path):
    # 256 training samples, batch 24: 10 batches per epoch; groups of 3: 4 steps per epoch.
    recorder = Recorder()
    trainer = make_trainer(
        tmp_path, data={"batch_size": 24}, grad_accum_steps=3, max_epochs=2, callbacks=[recorder]
    )
    assert trainer.batches_per_epoch == 10
    assert trainer.state.max_steps == 2 * math.ceil(10 / 3)
    state = trainer.fit()

    assert state.step == 8
    assert state.epoch == 2
    assert state.batches_in_epoch == 0
    assert state.samples_seen == 2 * 10 * 24
    evals = [step for name, step, _ in recorder.calls if name == "on_eval_end"]
    assert evals == [4, 8]  # the validation after the last epoch ran
    assert {"val/loss", "val/accuracy"} <= state.metrics.keys()
    assert 0.0 <= state.metrics["val/accuracy"] <= 1.0


# ------------------------------------------------------------------------------- hooks


def test_hook_order_matches_callback_docstring(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, data={"batch_size": 64}, max_epochs=2, callbacks=[recorder])
    trainer.fit()

    steps = 4
    per_epoch = (
        ["on_epoch_start"]
        + ["on_step_start", "on_step_end"] * steps
        + ["on_eval_end", "on_epoch_end"]
    )
    assert recorder.hooks == ["on_fit_start"] + per_epoch * 2 + ["on_fit_end"]
    assert set(recorder.hooks) == set(HOOKS)
    # state.step += 1 happens between on_step_start and on_step_end.
    starts = [s for name, s, _ in recorder.calls if name == "on_step_start"]
    ends = [s for name, s, _ in recorder.calls if name == "on_step_end"]
    assert starts == list(range(8))
    assert ends == list(range(1, 9))
    # on_epoch_end still sees the epoch it closes; the next on_epoch_start sees the next one.
    assert [e for name, _, e in recorder.calls if name == "on_epoch_end"] == [0, 1]
    assert [e for name, _, e in recorder.calls if name == "on_epoch_start"] == [0, 1]


def test_callbacks_run_in_list_order(tmp_path):
    order: list[str] = []

    class Named(Callback):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_step_start(self, state: TrainState) -> None:
            order.append(self.name)

    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[Named("a"), Named("b"), Named("c")])
    trainer.fit()
    assert order == ["a", "b", "c"] * 2


def test_every_kind_of_hook_fires_and_a_late_callback_joins_at_the_next_epoch(tmp_path):
    """Per-step hooks are looked up once per epoch, leaving out Callback's no-ops: an override
    that calls super(), a hook set on the instance, and a callback added mid-epoch (from the
    next epoch on, as the Callback map says) all still fire."""
    seen: list[tuple[str, int]] = []

    class CallsSuper(Callback):
        def on_step_end(self, state: TrainState) -> None:
            super().on_step_end(state)
            seen.append(("super", state.step))

    on_instance = Callback()
    on_instance.on_step_start = lambda state: seen.append(("instance", state.step))
    late = Callback()
    late.on_step_end = lambda state: seen.append(("late", state.step))

    class AddsLate(Callback):
        def on_step_end(self, state: TrainState) -> None:
            if state.step == 2:
                trainer.callbacks.append(late)

    trainer = make_trainer(
        tmp_path, max_epochs=2, callbacks=[CallsSuper(), on_instance, AddsLate()]
    )
    per_epoch = trainer.state.steps_per_epoch
    trainer.fit()
    steps = range(1, 2 * per_epoch + 1)
    assert [s for kind, s in seen if kind == "super"] == list(steps)
    assert [s for kind, s in seen if kind == "instance"] == [s - 1 for s in steps]
    assert [s for kind, s in seen if kind == "late"] == list(
        range(per_epoch + 1, 2 * per_epoch + 1)
    )


def test_on_exception_fires_and_error_propagates(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder])
    calls = []

    def explode(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("boom in forward")

    trainer.model.register_forward_pre_hook(explode)
    with pytest.raises(ValueError, match="boom in forward") as info:
        trainer.fit()

    assert recorder.hooks[-1] == "on_exception"
    assert "on_fit_end" not in recorder.hooks
    assert recorder.errors == [info.value]
    assert trainer.state.step == 2  # the third step never finished


def test_request_stop_stops_after_that_step(tmp_path):
    class StopAt(Callback):
        def on_step_end(self, state: TrainState) -> None:
            if state.step == 3:
                state.request_stop("enough at 3")
            if state.step == 4:  # never reached
                state.request_stop("too late")

    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_epochs=5, callbacks=[StopAt(), recorder])
    state = trainer.fit()

    assert state.step == 3
    assert state.should_stop
    assert state.stop_reason == "enough at 3"
    assert state.epoch == 0 and state.batches_in_epoch == 3  # the epoch stays open
    assert recorder.hooks.count("on_step_start") == 3
    assert recorder.hooks[-1] == "on_fit_end"
    # A second request keeps the first reason.
    state.request_stop("another reason")
    assert state.stop_reason == "enough at 3"


def test_request_stop_at_epoch_end(tmp_path):
    class StopAtEpochEnd(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            state.request_stop("one epoch is enough")

    trainer = make_trainer(tmp_path, max_epochs=5, callbacks=[StopAtEpochEnd()])
    state = trainer.fit()
    assert state.step == 8
    assert state.epoch == 1
    assert state.stop_reason == "one epoch is enough"


# ------------------------------------------------------------------------------- evaluation


def _reference_eval(model: torch.nn.Module, dataset) -> tuple[float, float]:
    samples = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([s[0] for s in samples])
    y = torch.stack([s[1] for s in samples])
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = model(x).flatten(0, -2).double()
    targets = y.flatten()
    loss = F.cross_entropy(logits, targets, reduction="sum").item() / targets.numel()
    accuracy = (logits.argmax(-1) == targets).sum().item() / targets.numel()
    return loss, accuracy


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluate_matches_reference(tmp_path, split):
    # 32 samples per split, eval batches of 10: 10 + 10 + 10 + 2. Dropout on, so eval mode matters.
    trainer = make_trainer(
        tmp_path, data={"eval_batch_size": 10}, model={"dropout": 0.5}, max_steps=3
    )
    trainer.fit()
    loader = trainer.val_loader if split == "val" else trainer.test_loader
    assert len(loader.dataset) % 10 != 0
    trainer.model.train()

    metrics = trainer.validate() if split == "val" else trainer.test()

    loss, accuracy = _reference_eval(trainer.model, loader.dataset)
    assert metrics.keys() == {f"{split}/loss", f"{split}/accuracy"}
    assert metrics[f"{split}/loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics[f"{split}/accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert trainer.state.metrics[f"{split}/loss"] == metrics[f"{split}/loss"]
    assert trainer.model.training  # the mode it had before
    # Deterministic: a second evaluation gives the same numbers (no dropout at eval time).
    again = trainer.validate() if split == "val" else trainer.test()
    assert again == metrics


def test_evaluate_without_loader_returns_nothing(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.evaluate(None, "val") == {}


# ------------------------------------------------------------------------------- precision


def test_bf16_autocast_on_cpu(tmp_path):
    dtypes: list[torch.dtype] = []
    fp32_losses, bf16_losses = StepLosses(), StepLosses()
    fp32 = make_trainer(tmp_path / "fp32", optim=ADAMW, max_steps=6, callbacks=[fp32_losses])
    bf16 = make_trainer(
        tmp_path / "bf16", optim=ADAMW, max_steps=6, precision="bf16", callbacks=[bf16_losses]
    )
    assert_same_weights(fp32.model, bf16.model)
    bf16.model.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))

    fp32.fit()
    bf16.fit()

    assert set(dtypes) == {torch.bfloat16}  # autocast really ran
    assert len(bf16_losses.losses) == 6
    assert all(math.isfinite(v) for v in bf16_losses.losses)
    assert bf16_losses.losses != fp32_losses.losses  # really a different precision
    for lo, hi in zip(bf16_losses.losses, fp32_losses.losses, strict=True):
        assert lo == pytest.approx(hi, rel=3e-2)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def test_fp16_refused_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        make_trainer(tmp_path, precision="fp16")


# ------------------------------------------------------------------------------- logging


def test_logged_train_loss_is_window_mean(tmp_path):
    # 16 steps, log every 5: windows 1-5, 6-10, 11-15 and the last step 16 (max_steps).
    logged = StepLosses()
    trainer = make_trainer(tmp_path, log_every_steps=5, max_epochs=2, callbacks=[logged])
    reference = clone_model(trainer)
    trainer.fit()
    dataset = trainer.train_loader.dataset
    ref_opt = _optimizer_like(SGD, reference)
    per_step = reference_fit(reference, ref_opt, dataset, batch_size=32, epochs=2, seed=0)

    assert sorted(logged.logged) == [5, 10, 15, 16]
    windows = {5: per_step[0:5], 10: per_step[5:10], 15: per_step[10:15], 16: per_step[15:16]}
    for step, window in windows.items():
        assert logged.logged[step] == pytest.approx(sum(window) / len(window), abs=1e-6)
    assert len(set(logged.losses)) == 4


def test_logged_lr_and_epoch(tmp_path):
    class Seen(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, float, float]] = []

        def on_step_end(self, state: TrainState) -> None:
            if "lr" in state.unlogged:
                self.rows.append((state.step, state.metrics["lr"], state.metrics["epoch"]))

    seen = Seen()
    trainer = make_trainer(tmp_path, log_every_steps=4, max_epochs=2, callbacks=[seen])
    trainer.fit()
    assert seen.rows == [(4, 0.1, 0), (8, 0.1, 0), (12, 0.1, 1), (16, 0.1, 1)]


# ------------------------------------------------------------------------------- language model


def test_language_model_path(tmp_path):
    trainer = make_trainer(
        tmp_path,
        dataset={
            "_target_": "trainer.data.datasets.stdlib_text",
            "block_size": 16,
            "max_bytes": 20_000,
        },
        model={"_target_": "trainer.models.TinyGPT", "dim": 32, "depth": 1, "heads": 2},
        optim=ADAMW,
        data={"batch_size": 16, "eval_batch_size": 24},
        max_steps=8,
        log_every_steps=1,
    )
    losses = StepLosses()
    trainer.callbacks.append(losses)

    at_init = trainer.validate()
    ref_loss, ref_accuracy = _reference_eval(trainer.model, trainer.val_loader.dataset)
    assert at_init["val/loss"] == pytest.approx(math.log(256), abs=0.1)
    assert at_init["val/loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert at_init["val/accuracy"] == pytest.approx(ref_accuracy, abs=1e-12)

    state = trainer.fit()
    assert state.step == 8
    assert all(math.isfinite(v) for v in losses.losses)
    assert losses.losses[-1] < losses.losses[0]

    after = trainer.validate()
    ref_loss, ref_accuracy = _reference_eval(trainer.model, trainer.val_loader.dataset)
    assert 0.0 <= after["val/accuracy"] <= 1.0
    assert after["val/accuracy"] == pytest.approx(ref_accuracy, abs=1e-12)
    assert after["val/loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert after["val/loss"] < at_init["val/loss"]


@pytest.mark.parametrize("every", [0, 4])
def test_gc_runs_on_the_loops_schedule_while_fitting(tmp_path, every):
    """gc_every_steps=4: Python's automatic GC is off during the fit and the young generations
    are collected after steps 4, 8, ...; it is back on when fit returns. 0: left alone."""
    collected_at: list[tuple[int, int]] = []  # (step, generation) of every collection in the fit

    class Watch(Callback):
        def __init__(self) -> None:
            self.enabled: list[bool] = []

        def on_step_end(self, state: TrainState) -> None:
            self.enabled.append(gc.isenabled())

    watch = Watch()
    trainer = make_trainer(tmp_path, callbacks=[watch], gc_every_steps=every, max_steps=12)

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            collected_at.append((trainer.state.step, info["generation"]))

    gc.callbacks.append(note)
    try:
        trainer.fit()
    finally:
        gc.callbacks.remove(note)
    assert gc.isenabled()
    if every:
        assert watch.enabled == [False] * 12
        assert collected_at == [(4, 1), (8, 1), (12, 1)]
    else:
        assert watch.enabled == [True] * 12


# ------------------------------------------------------------------------------- checkpoints


def test_an_epochs_last_checkpoint_carries_the_score_of_its_weights(tmp_path):
    """A checkpoint at a step that ends an epoch is written after that epoch's validation: the
    score in its manifest is what its weights score, retention keeps the truly best one, and
    a resume from it starts the next epoch."""
    checkpoint = {"every_steps": 8, "keep_last": 2, "best_monitor": "val/loss", "best_mode": "min"}
    # A high rate, so that the validation loss goes up again after epoch 3.
    optim = {**SGD, "lr": 0.5}
    trainer = make_trainer(tmp_path, optim=optim, max_epochs=5, checkpoint=checkpoint)
    per_epoch = trainer.state.steps_per_epoch
    assert per_epoch == 8  # so every checkpoint is at an epoch's last step
    measured = {}  # what the weights saved at each epoch's end score, evaluated as they train

    class Measure(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            measured[state.step] = state.measure("val")["val/loss"]

    trainer.callbacks.append(Measure())
    trainer.fit()
    best_step = min(measured, key=measured.get)
    assert best_step not in (32, 40)  # not among the last two, which retention keeps anyway
    folders = sorted((tmp_path / "checkpoints").iterdir())
    assert [f.name for f in folders] == [f"step_{s:08d}" for s in sorted({best_step, 32, 40})]
    assert trainer.checkpointer.best() == tmp_path / "checkpoints" / f"step_{best_step:08d}"
    for folder in folders:
        step = int(folder.name.removeprefix("step_"))
        saved = make_trainer(tmp_path / "scratch", optim=optim, resume=str(folder))
        saved.checkpointer.maybe_resume(saved)
        score = saved.measure(saved.val_loader, "val")["val/loss"]
        assert verify(folder)["monitor"] == {"val/loss": score} == {"val/loss": measured[step]}
        position = torch.load(folder / TRAINER_STATE, weights_only=True)["state"]
        assert (position["epoch"], position["batches_in_epoch"]) == (step // per_epoch, 0)


def test_current_tells_a_metric_of_these_weights_from_an_older_one(tmp_path):
    """Mid-epoch the last validation's score describes other weights; at the epoch's end it is
    this step's (what a checkpoint records as its score)."""
    seen = []

    class Look(Callback):
        def on_step_end(self, state: TrainState) -> None:
            seen.append((state.step, state.current("val/loss"), state.current("lr")))

        def on_epoch_end(self, state: TrainState) -> None:
            seen.append((state.step, state.current("val/loss"), None))
            assert state.current("val/loss") == state.metrics["val/loss"]

    make_trainer(tmp_path, max_epochs=2, log_every_steps=4, callbacks=[Look()]).fit()
    lr = SGD["lr"]  # logged on log steps

    def steps(first: int, last: int) -> list:
        return [(s, None, lr if s % 4 == 0 else None) for s in range(first, last + 1)]

    val = [current for step, current, _ in seen if current is not None]
    assert seen == [*steps(1, 8), (8, val[0], None), *steps(9, 16), (16, val[1], None)]


def test_a_dropped_trainer_is_freed_at_once_with_its_loader_workers(tmp_path):
    # No reference cycle holds a fitted trainer: dropping it frees it, and its loaders' worker
    # processes are told to stop in order. Left to the cyclic GC, each worker took DataLoader's
    # 5 s join timeout to go.
    trainer = make_trainer(tmp_path, data={"num_workers": 2}, max_epochs=1)
    trainer.fit()
    trainer.test()
    workers = [w for loader in (trainer.train_loader, trainer.test_loader)
               for w in loader._iterator._workers]  # fmt: skip
    assert workers and all(w.is_alive() for w in workers)
    released = weakref.ref(trainer)
    gc.disable()  # only reference counting may free it
    try:
        del trainer
        assert released() is None
    finally:
        gc.enable()
    for worker in workers:
        worker.join(timeout=2)
    assert not any(w.is_alive() for w in workers)


def test_resuming_a_finished_run_trains_hooks_and_logs_nothing(tmp_path):
    class Hooks(Callback):
        def __init__(self) -> None:
            self.called: list[str] = []

    def recorder() -> Hooks:
        hooks = Hooks()
        for name in HOOKS:
            setattr(hooks, name, lambda state, name=name: hooks.called.append(name))
        return hooks

    finished = make_trainer(tmp_path, max_epochs=1, checkpoint={"save_final": True})
    finished.fit()
    again, hooks = make_trainer(tmp_path, max_epochs=1, resume="auto"), recorder()
    again.callbacks.append(hooks)
    logged: list[int] = []
    again.logger.log_metrics = lambda metrics, step: logged.append(step)
    state = again.fit()
    assert (state.step, hooks.called, logged) == (finished.state.step, [], [])
    assert again.first_step_done is None
