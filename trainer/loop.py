"""The training loop: `Trainer.fit()`, `train_step()`, `evaluate()`. Read it top to bottom.

The loop owns every distributed chore so that callbacks and user code never do: positioning the
sampler for each epoch, skipping gradient sync during accumulation, reducing metrics across ranks,
agreeing on stop decisions, and deciding when checkpoints are written. `Callback`'s docstring
(trainer/callbacks/base.py) is the map of where each hook fires.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from trainer.callbacks.base import Callback
from trainer.config import TrainConfig
from trainer.data.loaders import batch_size_of, start_epoch
from trainer.distributed.clip import clip_grad_norm_, grad_norm, has_dtensors
from trainer.distributed.env import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    any_rank,
    dtype_of,
)
from trainer.distributed.parallelize import unwrap
from trainer.log_window import LogWindow
from trainer.loggers.base import Logger
from trainer.losses import CrossEntropy, Loss, flat_cross_entropy
from trainer.metrics import (
    EPOCH,
    SKIPPED_STEPS,
    TRAIN_LOSS,
    TRAIN_PERPLEXITY,
    eval_metrics,
    perplexity_metric,
)
from trainer.state import TrainState, rate_metrics
from trainer.stop_signals import stop_on_signals

Batch = Sequence[torch.Tensor]
log = logging.getLogger("hooktrain")


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        test_loader: DataLoader | None,
        cfg: TrainConfig,
        env: DistEnv,
        callbacks: Iterable[Callback] = (),
        logger: Logger | None = None,
        checkpointer: Any = None,  # trainer.checkpoint.Checkpointer; None saves nothing
        loss: Loss | None = None,  # what train_step minimizes (trainer/losses.py); default CE
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.cfg = cfg
        self.env = env
        self.callbacks = list(callbacks)
        self.logger = logger or Logger()
        self.checkpointer = checkpointer
        self.loss = loss or CrossEntropy()

        self.batches_per_epoch = len(train_loader)
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum_steps)
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training split gives no batch of data.batch_size={batch_size_of(train_loader)} "
                f"on each of {env.world_size} process(es); lower the batch size"
            )
        self.state = TrainState(
            model=model,
            optimizer=optimizer,
            max_steps=0,  # resolved by _budget(), here and again after a resume
            steps_per_epoch=steps_per_epoch,
            rank=env.rank,
            world_size=env.world_size,
            measure=_measure_through(weakref.ref(self)),
            train_data=train_loader.dataset,
        )
        self.state.max_steps = self._budget()
        # bf16 autocast needs no loss scaling; fp16 does, and only CUDA has fp16 autocast kernels.
        self.autocast_dtype = None if cfg.precision == "fp32" else dtype_of(cfg.precision)
        if cfg.precision == "fp16" and env.device.type != "cuda":
            raise ValueError("precision=fp16 needs a CUDA device; use precision=bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        # Sharded parameters need the DTensor-aware clipping; plain ones take torch's own, which
        # skips that check of every gradient on every step.
        self._clip = clip_grad_norm_ if has_dtensors(model) else nn.utils.clip_grad_norm_
        # Steady-state throughput: time and samples inside train_step, the first step (warm-up,
        # compilation) excluded.
        self.timed_seconds = 0.0
        self.timed_samples = 0
        self.first_step_done: float | None = None  # wall-clock time when the first step finished
        self.consecutive_skips = 0  # non-finite steps skipped in a row (nonfinite=skip)
        self.skipped_steps = 0
        self.preempted_by: str | None = (
            None  # the first stop signal's name (trainer/stop_signals.py)
        )
        self.save_on_stop = False  # a stop that must leave a checkpoint (signal, nonfinite=stop)
        self._stop_without_agreement = False  # nonfinite=stop: every rank asks at the same step
        self._window = LogWindow()
        self._held_row: dict[str, float] = {}  # a log step's row, while its all-reduce runs
        # Perplexity, exp(mean token cross-entropy), for models with a target per token (as the
        # throughput's tokens per sample counts them); train/perplexity only where train/loss is
        # that cross-entropy, not a distillation's mix or a smoothed one.
        self.sequences = torch.as_tensor(train_loader.dataset[0][1]).numel() > 1
        self._train_perplexity = (
            self.sequences and type(self.loss) is CrossEntropy and not self.loss.label_smoothing
        )

    # ---------------------------------------------------------------------------- fit
    def fit(self) -> TrainState:
        state = self.state
        try:
            with stop_on_signals(self._note_signal), _scheduled_gc(self.cfg.gc_every_steps):
                if self._maybe_resume() and state.step >= state.max_steps:
                    return state  # a finished run resumed: nothing to train, hook or log
                self._window = LogWindow()  # throughput is timed from here
                self._call("on_fit_start")
                while state.step < state.max_steps and not state.should_stop:
                    self._train_epoch()
                if self.checkpointer is not None:
                    self._flush_logs()
                    self.logger.flush()  # what the checkpoint covers is in the logs first
                    self.checkpointer.save_final(self, force=self.save_on_stop)
            state.interrupted = self.save_on_stop
            self._call("on_fit_end")
            self._flush_logs()
            self.logger.flush()  # when fit returns, its metrics are written
        except BaseException as err:
            for callback in self.callbacks:
                callback.on_exception(state, err)
            raise
        return state

    def _maybe_resume(self) -> bool:
        """Load the checkpoint that `resume` names, say so, and resolve the budget again: on
        another world size the epochs left are worth other step counts. An earlier attempt's
        rows beyond the step the fit goes on from are dropped from the logs (`Logger.rewind`).
        Returns whether a checkpoint was loaded."""
        if self.checkpointer is None:
            return False
        state = self.state
        folder = self.checkpointer.maybe_resume(self)
        if folder is not None:
            # Only a loaded checkpoint moves the budget: a fit called again on this trainer (as
            # the benchmarks do, raising state.max_steps) goes on to the budget it was given.
            state.max_steps = self._budget()
            if self.env.is_global_zero:
                log.info(f"resumed from {folder} (step {state.step}, epoch {state.epoch})")
        if self.cfg.resume:
            self.logger.rewind(state.step)
        return folder is not None

    def _budget(self) -> int:
        """The step at which the fit ends: `max_steps`, or else the end of epoch `max_epochs`
        counted from where the state stands."""
        cfg, state = self.cfg, self.state
        if cfg.max_steps > 0:
            return cfg.max_steps
        # Mid-epoch, the batches consumed are this world size's (a checkpoint saved mid-epoch
        # resumes only with the same global batch).
        steps_done = math.ceil(state.batches_in_epoch / cfg.grad_accum_steps)
        steps_left = (cfg.max_epochs - state.epoch) * state.steps_per_epoch - steps_done
        return state.step + max(0, steps_left)

    def _train_epoch(self) -> None:
        state, cfg = self.state, self.cfg
        start_epoch(self.train_loader, state.epoch, cfg.seed, skip_batches=state.batches_in_epoch)
        # Once per epoch, not per step (it visits every module); evaluation restores the mode.
        self.model.train()
        self._call("on_epoch_start")
        # Taken once per epoch: the per-step hooks run thousands of times, and most callbacks
        # leave most of them as Callback's no-ops.
        on_step_start, on_step_end = self._hooks("on_step_start"), self._hooks("on_step_end")
        for batches in _in_groups(self.train_loader, cfg.grad_accum_steps):
            for hook in on_step_start:
                hook(state)
            log_step = self._should_log(state.step + 1)
            started = time.perf_counter()
            loss, norm = self.train_step(batches)
            samples = self._global_samples(batches)
            if self.first_step_done is None:
                self.first_step_done = time.time()
            else:
                self.timed_seconds += time.perf_counter() - started
                self.timed_samples += samples
            state.step += 1
            state.batches_in_epoch += len(batches)
            state.samples_seen += samples
            self._window.add(loss, norm, samples)
            # Under torchrun a log step's all-reduce (loss window, stop flags) completes while the
            # next step runs; that step sends the log step's row.
            agreed = self._finish_reduce_in_flight()
            if log_step:
                self._window.start_reduce(state.step, self._stop_request_flags())
                state.log({**rate_metrics(self.optimizer), EPOCH: state.epoch})
                if not self._reduce_in_background():
                    agreed = self._finish_log_reduce()
            for hook in on_step_end:
                hook(state)
            if log_step:
                self._flush_logs()  # held while the all-reduce runs in the background
            if self.cfg.gc_every_steps and state.step % self.cfg.gc_every_steps == 0:
                gc.collect(1)  # the young generations: ~0.1 ms here, where a full pass takes ~150
            # The epoch's last step is saved after the epoch's end (_end_epoch): with its
            # validation's score, and so that a resume starts the next epoch.
            if state.batches_in_epoch < self.batches_per_epoch:
                self._maybe_save()
            # Stop flags are taken on as agreed even on the last step: that keeps the ranks alike
            # in whether the final checkpoint must be forced (a signal on one rank).
            if self._stop_now(agreed) or state.step >= state.max_steps:
                break
        # The epoch's end, and the fit's, see every metric and take on every agreed flag.
        agreed = self._finish_reduce_in_flight()
        if agreed is not None:
            self._apply_agreed(*agreed)
        # A stop inside the epoch leaves it open, so that a resume continues inside it.
        if state.batches_in_epoch >= self.batches_per_epoch:
            self._end_epoch()
            self._maybe_save()

    def _maybe_save(self) -> None:
        """A checkpoint when one is due; whatever it covers is written to the logs first, so
        that a crash after it loses no row that a resume would not log again."""
        if self.checkpointer is not None and self.checkpointer.due(self.state.step):
            self._flush_logs()
            self.logger.flush()
            self.checkpointer.save(self)

    def _end_epoch(self) -> None:
        state = self.state
        every = self.cfg.val_every_epochs
        if every and (state.epoch + 1) % every == 0:
            self.validate()
        self._call("on_epoch_end")
        state.epoch += 1
        state.batches_in_epoch = 0
        self._agree_to_stop()

    # ---------------------------------------------------------------------------- one step
    def train_step(self, batches: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the micro-batches, then one optimizer step. Returns the mean
        loss and the global gradient norm before clipping, as tensors. The step syncs with the
        host once, for the finiteness check of the gradient norm."""
        # Weight each micro-batch by its share of the step's samples, so that accumulation equals
        # one step on the combined batch even when the epoch's last micro-batch is short.
        count = sum(targets.numel() for _, targets in batches) if len(batches) > 1 else 0
        # Gradients are dropped at the start of the step, as torchtitan does, not after the
        # optimizer step: the MLP benchmark on CPU measured ~1.5% faster this way (where the
        # allocator puts the step's activations). Checkpoints never hold gradients either way.
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler if self.scaler.is_enabled() else None  # fp16's loss scaling
        losses = []
        for i, (inputs, targets) in enumerate(batches):
            last = i == len(batches) - 1
            inputs = inputs.to(self.env.device, non_blocking=True)
            targets = targets.to(self.env.device, non_blocking=True)
            # Gradients are reduced across ranks in backward; during accumulation only the last
            # micro-batch should. DDP decides in forward, FSDP2 in backward: both sit inside.
            with self._sync_gradients(last):
                with self._autocast():
                    loss = self.loss(self.model(inputs), targets, inputs)
                if len(batches) > 1:
                    loss = loss * (targets.numel() / count)
                losses.append(loss.detach())
                (loss if scaler is None else scaler.scale(loss)).backward()
        total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip and check the true gradients
        # The norm before clipping, also without clipping (one fused norm over the gradients):
        # the finiteness check needs it, and it is logged as train/grad_norm.
        if self.cfg.grad_clip > 0:
            norm = self._clip(self.model.parameters(), self.cfg.grad_clip)
        else:
            norm = grad_norm(self.model.parameters())
        # fp16's grad scaler skips non-finite steps itself; otherwise the policy decides. The norm
        # is global (DDP, FSDP2 and TP reduce it), so every rank reaches the same verdict.
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        elif self._finite_or_handled(total, norm):
            self.optimizer.step()
        return total, norm

    def _finite_or_handled(self, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """True if the step may go ahead; applies the `nonfinite` policy when it may not."""
        if math.isfinite(norm.item()):  # the one host sync per step
            self.consecutive_skips = 0
            return True
        state, policy = self.state, self.cfg.nonfinite
        what = f"non-finite loss or gradient norm at step {state.step + 1} (loss {loss.item():.4g}, grad norm {norm.item():.4g})"
        if policy == "skip":
            self.consecutive_skips += 1
            self.skipped_steps += 1
            state.log({SKIPPED_STEPS: self.skipped_steps})
            if self.consecutive_skips > self.cfg.max_consecutive_skips:
                raise FloatingPointError(
                    f"{what}: {self.consecutive_skips} steps in a row skipped, more than max_consecutive_skips={self.cfg.max_consecutive_skips}"
                )
            return False
        if policy == "stop":
            state.request_stop(f"{what}; stopped with a checkpoint (nonfinite=stop)")
            self.save_on_stop = True
            # The norm is global (DDP's averaged gradients, FSDP2's and TP's reduced norms), so
            # every rank gets here at this same step: they stop after it without agreeing.
            self._stop_without_agreement = True
            return False
        raise FloatingPointError(f"{what}; set nonfinite=skip or nonfinite=stop to go on")

    # ---------------------------------------------------------------------------- evaluation
    def validate(self) -> dict[str, float]:
        return self.evaluate(self.val_loader, "val")

    def test(self) -> dict[str, float]:
        return self.evaluate(self.test_loader, "test")

    def evaluate(self, loader: DataLoader | None, split: str) -> dict[str, float]:
        """Loss and accuracy over the whole split, summed exactly across ranks; logged, and
        `on_eval_end` fires. The loss is the plain cross-entropy whatever `loss` training
        minimizes (a distillation's mix, label smoothing), so that val/loss compares across runs."""
        metrics = self.measure(loader, split)
        if metrics:
            self.state.log(metrics)
            self._call("on_eval_end")
            self._flush_logs()
        return metrics

    @torch.no_grad()
    def measure(
        self, loader: DataLoader | None, split: str, model: nn.Module | None = None
    ) -> dict[str, float]:
        """`evaluate` without logging or hooks: what callbacks call through `state.measure`
        (e.g. pruning's accuracy before and after). Every rank must call it. `model`: a plain
        model to evaluate instead of the trainer's (a compressed copy), as it is (in eval mode:
        an exported graph refuses `.eval()`), without autocast, on the device of its tensors."""
        if loader is None:
            return {}
        own = model is None
        # DDP's wrapper is bypassed (its forward would broadcast buffers); FSDP2 and TP modules
        # gather shards in every forward, so each rank runs the same number of forwards. A plain
        # copy runs no collective: each rank evaluates its own batches, unpadded.
        model = unwrap(self.model) if own else model
        device = self.env.device if own else _device_of(model)
        batches = _padded(loader, all_reduce_max(len(loader), self.env.device)) if own else loader
        if own:
            was_training = model.training
            model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # loss, correct, count
        for inputs, targets in batches:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with self._autocast() if own else contextlib.nullcontext():
                logits = model(inputs)
            # 0-d sums: they add into the run's device whichever device the model is on
            sums[0] += flat_cross_entropy(logits, targets, reduction="sum")
            sums[1] += (logits.argmax(-1) == targets).sum()
            sums[2] += targets.numel()
        if own:
            model.train(was_training)
        loss_sum, correct, count = all_reduce_sum(sums, self.env.dp_group).tolist()
        metrics = dict(zip(eval_metrics(split), (loss_sum / count, correct / count), strict=True))
        if self.sequences:  # the loss is the mean over tokens
            metrics[perplexity_metric(split)] = _perplexity(loss_sum / count)
        return metrics

    def samples_per_second(self) -> float:
        """Global training samples per second in steady state (the first step excluded)."""
        return self.timed_samples / self.timed_seconds if self.timed_seconds else 0.0

    # ---------------------------------------------------------------------------- helpers
    def _call(self, hook: str) -> None:
        for method in self._hooks(hook):
            method(self.state)

    def _hooks(self, hook: str) -> list[Callable[[TrainState], None]]:
        """Each callback's `hook` method, in list order, leaving out `Callback`'s own no-ops."""
        base = getattr(Callback, hook)
        methods = (getattr(callback, hook) for callback in self.callbacks)
        return [m for m in methods if getattr(m, "__func__", None) is not base]

    def _should_log(self, step: int) -> bool:
        return step % self.cfg.log_every_steps == 0 or step == self.state.max_steps

    def _global_samples(self, batches: Sequence[Batch]) -> int:
        """The step's samples over all data-parallel ranks."""
        local = len(batches[0][0]) if len(batches) == 1 else sum(len(b[0]) for b in batches)
        return local * self.env.dp_size

    def _flush_logs(self) -> None:
        """Send what was logged since the last flush as this step's row; while this step's
        all-reduce runs in the background, hold the row until it is read."""
        state = self.state
        if self._window.in_flight and self._window.reducing_step == state.step:
            self._held_row = dict(state.unlogged)
        elif state.unlogged and self.env.is_global_zero:
            self.logger.log_metrics(dict(state.unlogged), state.step)
        state.unlogged.clear()

    def _reduce_in_background(self) -> bool:
        """Whether a log step's all-reduce may complete during the next step rather than at once.
        Waiting at once costs ~1 ms a log step over gloo on a busy 2-core machine (~1% of the MLP
        benchmark's DDP step time); in the background it costs ~0.04 ms. Not in one process (no
        collective to wait for), not on the last step, not before a checkpoint, and not where a
        callback checks a stop condition on log steps (`Callback.stops_on_log_steps`): it reads
        "train/loss" there."""
        step = self.state.step
        return (
            self.env.is_distributed
            and step < self.state.max_steps
            and not self._stops_on_log_steps()
            # A checkpoint of this step saves state.metrics: with this step's loss in it.
            and not (self.checkpointer is not None and self.checkpointer.due(step))
        )

    def _stops_on_log_steps(self) -> bool:
        return any(getattr(cb, "stops_on_log_steps", False) for cb in self.callbacks)

    def _finish_log_reduce(self) -> list[bool]:
        """Wait for the log step's all-reduce; log its metrics and return the agreed flags."""
        metrics, agreed = self._window_metrics()
        self.state.log(metrics)
        return agreed

    def _finish_reduce_in_flight(self) -> list[bool] | None:
        """Read the all-reduce of a log step that ran in the background: its metrics complete
        that step's held row, which is sent with that step's number. Returns the agreed flags,
        or None if no all-reduce was in flight."""
        if not self._window.in_flight:
            return None
        step = self._window.reducing_step
        metrics, agreed = self._window_metrics()
        self.state.metrics.update(metrics)
        if self.env.is_global_zero:
            self.logger.log_metrics({**self._held_row, **metrics}, step)
        self._held_row = {}
        return agreed

    def _window_metrics(self) -> tuple[dict[str, float], list[bool]]:
        """The reduced log window's metrics (with train/perplexity where it is logged) and the
        agreed stop flags."""
        metrics, agreed = self._window.finish_reduce(self.env)
        if self._train_perplexity:
            metrics[TRAIN_PERPLEXITY] = _perplexity(metrics[TRAIN_LOSS])
        return metrics, agreed

    def _stop_now(self, agreed: list[bool] | None) -> bool:
        """Whether every rank stops after this step. One process decides alone, after every step.
        Ranks decide when a log step's all-reduce completes (`agreed` is then not None): at once
        or, in the background, one step later (`_reduce_in_background`). Its flags went out
        before the log step's on_step_end, so a stop asked for after that goes with the next
        log step, or the epoch's end (`_end_epoch`) if it comes first. Where a callback checks
        a stop condition on log steps (`Callback.stops_on_log_steps`), ranks agree once more
        after on_step_end, so that its stop lands on that very step."""
        if self._stop_without_agreement:
            return True
        if not self.env.is_distributed:
            return self._apply_agreed(*self._stop_request_flags())
        if agreed is not None and self._stops_on_log_steps():
            return self._agree_to_stop()
        return agreed is not None and self._apply_agreed(*agreed)

    def _agree_to_stop(self) -> bool:
        """Every rank stops, and saves, if any rank asked to (one tiny all-reduce)."""
        return self._apply_agreed(*any_rank(self._stop_request_flags(), self.env.device))

    def _note_signal(self, name: str) -> None:
        self.preempted_by = self.preempted_by or name

    def _stop_request_flags(self) -> list[bool]:
        """This rank's [stop, save], after turning a stop signal into a stop request."""
        state = self.state
        if self.preempted_by and not state.should_stop:
            state.request_stop(f"received {self.preempted_by}: saved a checkpoint and stopped")
            self.save_on_stop = True
            if self.env.is_global_zero:
                log.warning(f"received {self.preempted_by}: stopping with a checkpoint")
        return [state.should_stop, self.save_on_stop]

    def _apply_agreed(self, stop: bool, save: bool) -> bool:
        """Take on the ranks' agreed [stop, save]; a save asked for here since is kept."""
        if stop and not self.state.should_stop:
            self.state.request_stop("another rank requested a stop")
        self.save_on_stop = self.save_on_stop or save
        return stop

    def _sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self._without_gradient_sync()

    @contextlib.contextmanager
    def _without_gradient_sync(self) -> Iterator[None]:
        model = self.model
        if hasattr(model, "no_sync"):  # DDP
            with model.no_sync():
                yield
        elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            yield

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)


def _measure_through(trainer: weakref.ref[Trainer]) -> Callable[..., dict[str, float]]:
    """`state.measure`: a quiet evaluation of "val" or "test". It holds the trainer weakly: a
    cycle trainer -> state -> trainer would leave a dropped trainer to Python's cyclic GC, which
    finalizes the loaders' worker queues before the workers are told to stop, so each worker
    process then takes DataLoader's 5 s join timeout to go (15 s for a trainer with 2 workers)."""

    def measure(split: str, model: nn.Module | None = None) -> dict[str, float]:
        owner = trainer()
        loader = {"val": owner.val_loader, "test": owner.test_loader}[split]
        return owner.measure(loader, split, model)

    return measure


def _perplexity(mean_cross_entropy: float) -> float:
    """exp of a mean cross-entropy; inf past float's range (a diverged loss), not an error."""
    try:
        return math.exp(mean_cross_entropy)
    except OverflowError:
        return math.inf


def _device_of(model: nn.Module) -> torch.device:
    """Where a model's tensors are (the CPU for one without any)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


@contextlib.contextmanager
def _scheduled_gc(every_steps: int) -> Iterator[None]:
    """Python's automatic GC off while fitting, when the loop collects every `every_steps` steps.

    The automatic GC runs whenever enough objects were allocated: about once a step in a small
    loop (a loader fetching sample by sample makes a tuple per sample), now and then a full pass
    over every object of the process (~150 ms with wandb, Hydra and torch loaded), and on each rank at a
    different moment, which stalls the others at the next gradient all-reduce. Collecting the
    young generations on a schedule, as torchtitan does, makes that cost small and the same step
    on every rank."""
    if not every_steps or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _padded(loader: DataLoader, count: int) -> Iterator[Batch]:
    """The loader's batches, then empty batches of the same shape until `count` in all."""
    batch = None
    for batch in loader:
        yield batch
    if batch is None:  # this rank's shard is empty: shape an empty batch from the dataset
        batch = [t.unsqueeze(0) for t in loader.dataset.dataset[0]]
    for _ in range(count - len(loader)):
        yield [t[:0] for t in batch]


def _in_groups(loader: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Micro-batches grouped per optimizer step; the epoch's last group may be shorter."""
    group: list[Batch] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
