"""Early stopping: end the fit when a monitored metric stops improving (Lightning's rules).

A *check* reads ``state.metrics[monitor]`` and updates the best value and a patience counter:

- ``check_on="eval"`` (default): one check in every ``on_eval_end`` of the fit (after each
  validation; the test split evaluated after the fit is never checked).
- ``check_on="step"``: one check in ``on_step_end`` whenever ``monitor`` is fresh in
  ``state.unlogged`` -- for ``train/loss`` that is every ``log_every_steps`` steps.

At each check, in this order:

1. ``check_finite`` and the value is NaN or +-inf: stop now (the best is left unchanged).
2. Improvement: the first check with a comparable value (not NaN) always sets the best. After
   that a value improves only when it is better than the best by MORE than ``min_delta``
   (``mode="min"``: ``value < best - min_delta``; ``mode="max"``: ``value > best + min_delta``),
   so an improvement of exactly ``min_delta`` does not count. An improvement sets the best,
   resets ``wait_count`` to 0 and (``restore_best_weights``) copies the weights; any other check,
   NaN included when ``check_finite=False``, adds 1 to ``wait_count``.
3. ``stopping_threshold``: the value is strictly better than it (min: ``value < threshold``): stop.
4. ``divergence_threshold``: the value is strictly worse than it (min: ``value > threshold``): stop.
5. Patience (only on a check without improvement): ``wait_count >= patience`` stops, Lightning's
   rule: ``wait_count`` is raised before the comparison, so ``patience=0`` and ``patience=1`` both
   stop at the first check without improvement, ``patience=3`` at the third consecutive one.

Stopping calls ``state.request_stop(reason)``; the reason is kept in ``state.stop_reason``, logged
as ``early_stopping/stopped_step`` (the optimizer step after which the fit ends) and printed on
rank zero through the ``hooktrain.early_stopping`` logger. Every rank evaluates the same metrics
(the loop reduces train and validation metrics across ranks before any hook sees them), and the
loop's all-reduce of ``should_stop`` ends all ranks after the same step in any case: with
``check_on="step"`` (``stops_on_log_steps``) right after the check's log step, with
``check_on="eval"`` at the end of the epoch that validated.

``restore_best_weights`` keeps a clone of ``get_model_state_dict(state.model)`` at every
improvement -- per rank: a full replica under DDP, this rank's shards (DTensors) under FSDP2 or
TP, so the copy costs one more set of this rank's parameters and buffers on their device -- and
loads it back with ``set_model_state_dict`` in ``on_fit_end``, whether or not the fit stopped
early. Only the weights are restored, never the optimizer. The final checkpoint is written before
``on_fit_end``, so it holds the last weights; the model in memory (and ``test_after_fit``) gets
the best ones, which are also written to ``<run dir>/best_model.pt`` (trainer/export.py).

``state_dict()`` saves the best value, ``wait_count``, the stopped step and the number of checks;
the best weights are NOT saved. After a resume, ``restore_best_weights`` can only restore an
improvement made after the resume; if there is none, the last weights are kept and a warning says
so.

The monitored metric must be in ``state.metrics`` when the check runs, written by the loop or by
a callback placed before this one; otherwise a ``RuntimeError`` names the key and the available
keys (``check_on="step"``: raised on the first log step where the key has never been logged).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from trainer.callbacks.base import Callback
from trainer.state import TrainState

log = logging.getLogger("hooktrain.early_stopping")

MODES = ("min", "max")
CHECK_ON = ("eval", "step")


class EarlyStopping(Callback):
    """Stop the fit when ``monitor`` has not improved for ``patience`` checks (see the module doc).

    Args:
        monitor: the key in ``state.metrics`` to watch (``val/loss``, ``val/accuracy``,
            ``train/loss``, or one a callback before this one writes).
        mode: ``min`` (lower is better) or ``max``.
        patience: checks without improvement before stopping; stop when ``wait_count >= patience``.
        min_delta: an improvement must exceed this (>= 0); exactly ``min_delta`` does not count.
        stopping_threshold: stop as soon as the value is strictly better than this.
        divergence_threshold: stop as soon as the value is strictly worse than this.
        check_finite: stop as soon as the value is NaN or infinite.
        check_on: ``eval`` (after each validation) or ``step`` (when ``monitor`` is freshly logged).
        restore_best_weights: load the weights of the best check back at the end of the fit,
            and write them to ``<run dir>/best_model.pt`` (trainer/export.py's format).
        verbose: print improvements and the stop reason on rank zero.
    """

    @classmethod
    def config_order_error(
        cls, node: Mapping[str, Any], earlier: Sequence[tuple[str, type]]
    ) -> str | None:
        # Callbacks run in config order: restoring the best weights at the end of the fit,
        # after a callback that edited them for good there (pruning), would undo the edit.
        if not node.get("restore_best_weights", False):
            return None
        for name, callback in earlier:
            if getattr(callback, "edits_weights_at_fit_end", False):
                return (
                    f"restores the best weights at the end of the fit, so it must come before "
                    f"callbacks.{name} (it would undo what that one did to the weights); "
                    "list it first"
                )
        return None

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        check_on: str = "eval",
        restore_best_weights: bool = False,
        verbose: bool = True,
        run_dir: str | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty metric name, got {monitor!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        if not _is_real(min_delta) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        for name, value in (
            ("stopping_threshold", stopping_threshold),
            ("divergence_threshold", divergence_threshold),
        ):
            if value is not None and (not _is_real(value) or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number or null, got {value!r}")
        if stopping_threshold is not None and divergence_threshold is not None:
            better = stopping_threshold < divergence_threshold
            if better != (mode == "min"):
                raise ValueError(
                    f"divergence_threshold={divergence_threshold} must be worse than "
                    f"stopping_threshold={stopping_threshold} for mode={mode} "
                    f"({'above' if mode == 'min' else 'below'} it)"
                )
        if check_on not in CHECK_ON:
            raise ValueError(f"check_on must be one of {', '.join(CHECK_ON)}; got {check_on!r}")
        for name, value in (
            ("check_finite", check_finite),
            ("restore_best_weights", restore_best_weights),
            ("verbose", verbose),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.stopping_threshold = None if stopping_threshold is None else float(stopping_threshold)
        self.divergence_threshold = (
            None if divergence_threshold is None else float(divergence_threshold)
        )
        self.check_finite = check_finite
        self.check_on = check_on
        self.restore_best_weights = restore_best_weights
        self.verbose = verbose
        self.run_dir = run_dir  # given by the trainer: where best_model.pt goes

        # Saved in checkpoints (state_dict):
        self.best: float | None = None  # None until the first comparable value
        self.wait_count = 0
        self.stopped_step: int | None = None  # the step after which this callback stopped the fit
        self.checks = 0
        # Not saved:
        self.best_weights: dict[str, Any] | None = None
        self.best_step: int | None = None  # the step whose weights `best_weights` holds
        self._fitting = False
        self._checks_at_start = 0

    # ------------------------------------------------------------------------- hooks
    def on_fit_start(self, state: TrainState) -> None:
        self._fitting = True
        self._checks_at_start = self.checks
        self.best_weights = None
        self.best_step = None

    @property
    def stops_on_log_steps(self) -> bool:  # see Callback: the stop then lands on its check step
        return self.check_on == "step"

    def on_eval_end(self, state: TrainState) -> None:
        if self._fitting and self.check_on == "eval":
            self._check(state, self._read(state))

    def on_step_end(self, state: TrainState) -> None:
        if not self._fitting or self.check_on != "step":
            return
        if self.monitor in state.unlogged:
            self._check(state, self._read(state))
        elif "train/loss" in state.unlogged and self.monitor not in state.metrics:
            self._read(state)  # a log step and the key was never logged: raise, naming it

    def on_fit_end(self, state: TrainState) -> None:
        self._fitting = False
        if self.checks == self._checks_at_start and state.is_global_zero:
            warnings.warn(
                f"EarlyStopping never checked {self.monitor!r} during the fit "
                f"(check_on={self.check_on}: no "
                f"{'validation ran' if self.check_on == 'eval' else 'fresh value was logged'})",
                RuntimeWarning,
                stacklevel=2,
            )
        if not self.restore_best_weights:
            return
        if self.best_weights is None:
            if state.is_global_zero:
                warnings.warn(
                    "EarlyStopping(restore_best_weights=True): no improvement of "
                    f"{self.monitor!r} was seen in this fit (best weights are not kept across "
                    "a resume), so the last weights are kept",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        set_model_state_dict(state.model, self.best_weights)
        # A run with a record (config.yaml, written by `hooktrain` and `trainer.api.fit`)
        if self.run_dir is not None and (Path(self.run_dir) / "config.yaml").is_file():
            from trainer.export import write_best_weights

            # every rank: it gathers the shards
            write_best_weights(state.model, self.run_dir, state.train_data)
        if self.verbose and state.is_global_zero:
            log.info(
                "early stopping: restored the weights of step %d (%s = %.6g)",
                self.best_step,
                self.monitor,
                self.best,
            )

    def on_exception(self, state: TrainState, error: BaseException) -> None:
        self._fitting = False

    # ------------------------------------------------------------------------- the rule
    def _read(self, state: TrainState) -> float:
        if self.monitor not in state.metrics:
            available = ", ".join(sorted(state.metrics)) or "none yet"
            raise RuntimeError(
                f"EarlyStopping: the monitored metric {self.monitor!r} is not in state.metrics "
                f"at step {state.step} (check_on={self.check_on}); available keys: {available}. "
                "Set callbacks.<name>.monitor to one of them, or place the callback that logs it "
                "before EarlyStopping"
            )
        return float(state.metrics[self.monitor])

    def _better(self, a: float, b: float) -> bool:
        """`a` strictly better than `b` (False whenever either is NaN)."""
        return a < b if self.mode == "min" else a > b

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        shifted = value + self.min_delta if self.mode == "min" else value - self.min_delta
        return self._better(shifted, self.best)

    def _check(self, state: TrainState, value: float) -> None:
        self.checks += 1
        name = self.monitor
        if self.check_finite and not math.isfinite(value):
            self._stop(
                state,
                f"{name} = {value} is not finite (best {self._fmt(self.best)}); "
                "stopping (check_finite=True)",
            )
            return
        improved = self._improves(value)
        if improved:
            previous = self.best
            self.best = value
            self.wait_count = 0
            if self.restore_best_weights:
                self._keep_weights(state)
            if self.verbose and state.is_global_zero:
                if previous is None:
                    log.info("early stopping: %s = %.6g is the first best", name, value)
                else:
                    log.info(
                        "early stopping: %s improved by %.6g to %.6g (min_delta %g)",
                        name,
                        abs(previous - value),
                        value,
                        self.min_delta,
                    )
        else:
            self.wait_count += 1
        if self.stopping_threshold is not None and self._better(value, self.stopping_threshold):
            sign = "<" if self.mode == "min" else ">"
            self._stop(
                state,
                f"{name} = {value:.6g} {sign} stopping_threshold {self.stopping_threshold:g}",
            )
        elif self.divergence_threshold is not None and self._better(
            self.divergence_threshold, value
        ):
            sign = ">" if self.mode == "min" else "<"
            self._stop(
                state,
                f"{name} = {value:.6g} {sign} divergence_threshold {self.divergence_threshold:g} "
                "(diverged)",
            )
        elif not improved and self.wait_count >= self.patience:
            self._stop(
                state,
                f"{name} did not improve by more than min_delta={self.min_delta:g} over the best "
                f"{self._fmt(self.best)} in {self.wait_count} consecutive check(s) "
                f"(patience={self.patience})",
            )

    def _stop(self, state: TrainState, why: str) -> None:
        self.stopped_step = state.step
        reason = f"early stopping at step {state.step}: {why}"
        state.request_stop(reason)
        state.log({"early_stopping/stopped_step": float(state.step)})
        if self.verbose and state.is_global_zero:
            log.info("%s", reason)

    def _keep_weights(self, state: TrainState) -> None:
        weights = get_model_state_dict(state.model)
        self.best_weights = {k: _clone(v) for k, v in weights.items()}
        self.best_step = state.step

    @staticmethod
    def _fmt(value: float | None) -> str:
        return "none yet" if value is None else f"{value:.6g}"

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The best value, wait_count, stopped step and check count (not the best weights)."""
        return {
            "monitor": self.monitor,
            "best": self.best,
            "wait_count": self.wait_count,
            "stopped_step": self.stopped_step,
            "checks": self.checks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("monitor", self.monitor)
        if saved != self.monitor:
            warnings.warn(
                f"EarlyStopping: the checkpoint monitored {saved!r}, this run monitors "
                f"{self.monitor!r}; starting the early-stopping state afresh",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.wait_count = int(state.get("wait_count", 0))
        stopped = state.get("stopped_step")
        self.stopped_step = None if stopped is None else int(stopped)
        self.checks = int(state.get("checks", 0))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
