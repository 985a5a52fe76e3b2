"""Quantization-aware training: the last epochs train fake-quantized, then the int8 conversion.

    callbacks=[progress,qat]                                   # static int8 (PT2E, x86), last 3 epochs
    callbacks.qat.mode=dynamic callbacks.qat.epochs=5          # or weight_only
    hooktrain experiment=mnist1d_cnn_qat

With E = max_epochs (or max_steps / steps_per_epoch) and f = `epochs`, the fake-quantized phase
starts before the first step of epoch E - f (step (E - f) * steps_per_epoch), the same "last f
epochs" as pruning's fine-tune. Before it, the model trains in float; from it on, every forward
of the Linear (static: and Conv) layers sees int8-rounded weights and inputs, as the int8 model
will (`trainer/compress/qat.py` says which scheme each mode fakes), with straight-through
gradients. Validation during the phase measures the fake-quantized model.

The layers are swapped when the model is built, before DDP / FSDP2 wrap it (`prepare_model`):
the swapped layers keep their Parameters, so the optimizer, sharding and checkpoints are those of
the float model. Whether fake quantization is on follows from `state.step` alone and the swapped
layers hold no state, so a run resumed inside the phase continues exactly as an uninterrupted one.

When the phase starts, the model as it is then is quantized post-training the way the `Quantize`
callback does (`compare_ptq`): the report's `dense` and `quantized_<mode>` rows, saved in
checkpoints with the report. At `on_fit_end` the fake-quantized layers are turned back into
plain float ones and converted by the same post-training quantization (same calibration
samples): the `qat_<mode>` row and its artifact (`qat_model.pt`), so that the report compares
PTQ and QAT of one run at the same bits. A fit stopped to be resumed (`state.interrupted`) skips
the conversion: the resumed run converts at its end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from trainer.callbacks.quantize import Quantize
from trainer.compress import qat
from trainer.distributed.parallelize import unwrap
from trainer.errors import ConfigError
from trainer.pruning.shrink import plain_copy
from trainer.state import TrainState

log = logging.getLogger("hooktrain")


class QuantizationAwareTraining(Quantize):
    """Fake-quantized last epochs, then int8 conversion and the report; see the module docstring.

    Args:
        mode: `static` (PT2E x86 int8 at the end: Linear and Conv), `dynamic` (torchao int8
            weights and per-token activations: Linear) or `weight_only` (int8 weights: Linear).
        epochs: f >= 1, the last epochs of the fit, trained fake-quantized.
        compare_ptq: when the phase starts, add the post-training `quantized_<mode>` row of the
            model as it is then (and `dense`, if the report has no row yet).
        calibration_batches, calibration_batch_size, stage (default `qat_<mode>`), artifact,
            latency_batches, latency_repeats, latency_budget_s, compiled_latency, run_dir: as
            for `Quantize`.
    """

    # A Quantize callback listed after this one would quantize the fake-quantized layers: its
    # config_order_error can refuse callbacks that set this.
    fake_quantizes_model = True

    @classmethod
    def config_order_error(
        cls, node: Mapping[str, Any], earlier: Sequence[tuple[str, type]]
    ) -> str | None:
        # A Quantize callback's on_fit_end before this one's would quantize the fake-quantized
        # layers themselves; this callback adds the post-training row itself (compare_ptq).
        for name, callback in earlier:
            if issubclass(callback, Quantize) and not issubclass(callback, cls):
                return (
                    f"cannot follow callbacks.{name}: quantization-aware training adds the "
                    "post-training row itself (compare_ptq=true); remove that callback"
                )
        return None

    def __init__(
        self,
        mode: str = "static",
        epochs: int = 3,
        compare_ptq: bool = True,
        calibration_batches: int = 8,
        calibration_batch_size: int = 64,
        stage: str | None = None,
        artifact: str = "qat_model.pt",
        latency_batches: Sequence[int] = (1, 256),
        latency_repeats: int = 30,
        latency_budget_s: float = 20.0,
        compiled_latency: bool = True,
        run_dir: str | None = None,
    ) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"qat.epochs: must be an integer >= 1, got {epochs!r}")
        shared = {
            "mode": mode,
            "calibration_batches": calibration_batches,
            "calibration_batch_size": calibration_batch_size,
            "latency_batches": latency_batches,
            "latency_repeats": latency_repeats,
            "latency_budget_s": latency_budget_s,
            "compiled_latency": compiled_latency,
        }
        super().__init__(**shared, stage=stage or f"qat_{mode}", artifact=artifact, run_dir=run_dir)
        self.epochs = epochs
        # The post-training row at the phase's start: Quantize's own, under its default stage
        # name, not exported (run_dir=None), its report written with this one's at the end.
        self.ptq = Quantize(**shared) if compare_ptq else None
        self.start: int | None = None  # the step the phase starts at, once the fit is known
        self.layers: list[str] = []  # the fake-quantized layers' names

    # ------------------------------------------------------------------------------ schedule
    def plan(self, max_steps: int, steps_per_epoch: int) -> int:
        """The step the fake-quantized phase starts at in a fit of `max_steps`."""
        start = max_steps - self.epochs * steps_per_epoch
        if start < 0:
            raise ConfigError(
                f"callbacks.qat.epochs: {self.epochs} fake-quantized epochs of {steps_per_epoch} "
                f"steps exceed the {max_steps} steps of the fit"
            )
        return start

    # ------------------------------------------------------------------------------ the model
    def check_model(self, model: nn.Module) -> None:
        """Refuse a model with nothing to fake-quantize, or nothing the conversion quantizes."""
        super().check_model(model)
        if not qat.fakeable_layers(model, self.mode):
            kinds = "Linear/Conv1d/Conv2d" if self.mode == "static" else "Linear"
            raise ValueError(
                f"{type(model).__name__} has no plain {kinds} layer below it with 2 or more "
                f"weights per output: nothing to fake-quantize with mode {self.mode!r}"
            )

    def prepare_model(self, model: nn.Module) -> None:
        """Swap in the fake-quantized layers (off), before wrapping and the optimizer."""
        self.layers = qat.fakeable_layers(model, self.mode)
        qat.prepare(model, self.mode)

    # ------------------------------------------------------------------------------ hooks
    def on_fit_start(self, state: TrainState) -> None:
        self.start = self.plan(state.max_steps, state.steps_per_epoch)
        # Resumed inside the phase: on at once. At its very start, on_step_start begins it.
        qat.set_fake_quant(unwrap(state.model), state.step > self.start)

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.start:
            self._begin(state)

    def on_fit_end(self, state: TrainState) -> None:
        if state.interrupted:
            if state.is_global_zero:
                log.info("qat: stopped to be resumed; the resumed run converts to int8 at its end")
            return
        if state.step <= self.start and state.is_global_zero:  # stopped early, e.g. early stopping
            log.warning(
                f"qat: the fit ended at step {state.step}, before the fake-quantized epochs"
            )
        with self._float_model(state):
            super().on_fit_end(state)

    # ------------------------------------------------------------------------------ phases
    def _begin(self, state: TrainState) -> None:
        """Record the post-training row of the weights as they are now, then fake-quantize."""
        report = state.compression
        if self.ptq is not None and (report is None or report.row(self.ptq.stage) is None):
            with self._float_model(state):
                self.ptq.on_fit_end(state)  # every rank: a collective under FSDP2 and DDP
        qat.set_fake_quant(unwrap(state.model), True)
        if state.is_global_zero:
            log.info(
                f"qat: {len(self.layers)} layers fake-quantized ({self.mode}) from step "
                f"{state.step} of {state.max_steps}"
            )

    @contextlib.contextmanager
    def _float_model(self, state: TrainState) -> Iterator[None]:
        """While it is open, `state.model` is a plain float copy (fake-quantized layers turned
        back into float ones, full weights) and the trainer's own model runs without fake
        quantization, so that `Quantize` quantizes and measures the float model."""
        live, wrapped = unwrap(state.model), state.model
        was_on = qat.fake_quant_enabled(live)
        qat.set_fake_quant(live, False)
        state.model = qat.to_float_layers(plain_copy(wrapped))  # a collective under FSDP2
        try:
            yield
        finally:
            state.model = wrapped
            qat.set_fake_quant(live, was_on)
