"""Post-training int8 quantization at the end of a fit, with its row in the compression report.

    callbacks=[progress,quantize]                              # static int8 (PT2E, x86), report
    callbacks.quantize.mode=dynamic                            # or weight_only
    'callbacks=[progress,pruning,quantize]'                    # prune, then quantize the result

At `on_fit_end` (after the last validation, and after the `on_fit_end` of the callbacks listed
before it, e.g. pruning's), every rank takes a plain full-weight CPU copy of the trained model
(DDP unwrapped, FSDP2's shards gathered), quantizes it the same way from the same calibration
batches (fixed training samples, the same on every rank, not a rank's shard), so every rank holds
the same int8 model, and evaluates it on val and test through the loop's exact evaluation. Rank 0
exports it as a weights-only artifact (`quantized_model.pt`, and `quantized_model.pt.xz`, the
same compressed with xz, which packs a pruned model's zeros; both loaded back by
`trainer.compress.quantize.load_quantized`) and measures it (`trainer.compress.report`); the row
goes to every rank, into the run's compression report (`compression_report.*` in the run folder)
and the logs as `compression/<stage>/<metric>`. If the report has no row yet, the float model is
measured first as the `dense` row.

It holds no state: quantization happens after the last step, so a run resumed from a checkpoint
quantizes at its end exactly as an uninterrupted one does. A fit that stopped to be resumed (a
stop signal, `state.interrupted`) quantizes nothing: the resumed run will, at its own end. The
other ranks wait for rank 0's measurement at a broadcast, which must end within
`parallel.timeout_s`: keep the latency budget and compiling well inside it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.callbacks.base import Callback
from trainer.compress.quantize import (
    MODES,
    _check_quantizable,
    compress_artifact,
    quantize,
    require_torchao,
    save_quantized,
)
from trainer.compress.report import CompressionReport, Timing, measure_stage
from trainer.compress.samples import evaluated, fixed_samples
from trainer.distributed.env import broadcast_object
from trainer.errors import ConfigError
from trainer.pruning.shrink import plain_copy
from trainer.state import TrainState

log = logging.getLogger("hooktrain")


class Quantize(Callback):
    """Quantize the trained model to int8 after the fit; see the module docstring.

    Args:
        mode: `static` (PT2E with the x86 quantizer: Linear and Conv, calibrated; fast only
            compiled), `dynamic` (torchao: Linear weights int8, activations quantized at run
            time) or `weight_only` (torchao: Linear weights int8; size only).
        calibration_batches, calibration_batch_size: static mode's calibration pass, over the
            first batches of a fixed permutation of the training set.
        stage: the report's row and metric name (default `quantized_<mode>`).
        artifact: the exported file's name in the run folder.
        latency_batches, latency_repeats, latency_budget_s, compiled_latency: CPU latency per
            batch size, median of at most `latency_repeats` calls within a budget in seconds for
            each row, eager and (unless off) under `torch.compile`.
        run_dir: the run folder, injected by the trainer (None: nothing is written).
    """

    def __init__(
        self,
        mode: str = "static",
        calibration_batches: int = 8,
        calibration_batch_size: int = 64,
        stage: str | None = None,
        artifact: str = "quantized_model.pt",
        latency_batches: Sequence[int] = (1, 256),
        latency_repeats: int = 30,
        latency_budget_s: float = 20.0,
        compiled_latency: bool = True,
        run_dir: str | None = None,
    ) -> None:
        _check(mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        _check(
            calibration_batches >= 1,
            "calibration_batches",
            f"must be >= 1, got {calibration_batches}",
        )
        _check(
            calibration_batch_size >= 1,
            "calibration_batch_size",
            f"must be >= 1, got {calibration_batch_size}",
        )
        _check(
            bool(artifact) and Path(artifact).name == artifact,
            "artifact",
            f"must be a file name, got {artifact!r}",
        )
        self.timing = Timing.of_options(
            "quantize", latency_batches, latency_repeats, latency_budget_s, compiled_latency
        )
        try:
            require_torchao()  # torchao missing, too old, or on a torch older than it needs
        except ConfigError as err:
            raise ValueError(str(err)) from None
        self.mode = mode
        self.calibration_batches = calibration_batches
        self.calibration_batch_size = calibration_batch_size
        self.stage = stage or f"quantized_{mode}"
        self.artifact = artifact
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.quantized: nn.Module | None = None  # the int8 model, once the fit has ended

    @classmethod
    def config_order_error(
        cls, node: Mapping[str, Any], earlier: Sequence[tuple[str, type]]
    ) -> str | None:
        # After quantization-aware training the trainer's layers are fake-quantized ones, which
        # this would quantize as they are; that callback adds the post-training row itself.
        for name, callback in earlier:
            if getattr(callback, "fake_quantizes_model", False):
                return (
                    f"cannot follow callbacks.{name}: it adds the post-training row itself "
                    "(compare_ptq); remove this callback"
                )
        return None

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model with no layer this mode quantizes (before anything trains)."""
        _check_quantizable(model, self.mode)

    def on_fit_end(self, state: TrainState) -> None:
        if state.interrupted:  # agreed across ranks: every rank skips alike
            if state.is_global_zero:
                log.info(
                    "quantize: skipped, the fit stopped to be resumed; the resumed run "
                    "quantizes at its end"
                )
            return
        report = CompressionReport.of(state)
        samples = self._samples(state)
        float_model = self.float_model(state)  # a collective under FSDP2
        if not report.rows:
            dense_accuracy = evaluated(state)
            self._add(
                state,
                report,
                lambda: measure_stage(
                    "dense",
                    float_model,
                    samples,
                    accuracy=dense_accuracy,
                    timing=self.timing,
                    note="the trained float model",
                ),
            )
        size = self.calibration_batch_size
        calibration = list(samples[: self.calibration_batches * size].split(size))
        self.quantized = quantized = quantize(float_model, self.mode, calibration)
        accuracy = evaluated(state, quantized)

        def measure_quantized() -> dict[str, Any]:
            with tempfile.TemporaryDirectory() as scratch:
                folder = self.run_dir or Path(scratch)
                path = save_quantized(quantized, self.mode, folder / self.artifact)
                if self.run_dir is not None:
                    compress_artifact(path)
                return measure_stage(
                    self.stage,
                    quantized,
                    samples,
                    accuracy=accuracy,
                    artifact=path,
                    float_model=float_model,
                    timing=self.timing,
                    note=f"int8 {self.mode}"
                    + (f", {path.name} (xz: {path.name}.xz)" if self.run_dir else ""),
                )

        self._add(state, report, measure_quantized)
        if state.is_global_zero and self.run_dir is not None:
            report.write(self.run_dir, state.step)

    def _add(
        self, state: TrainState, report: CompressionReport, measure: Callable[[], dict[str, Any]]
    ) -> None:
        """Rank 0 measures the row, every rank adds the same row."""
        report.add(state, broadcast_object(measure() if state.is_global_zero else None))

    def _samples(self, state: TrainState) -> torch.Tensor:
        """Inputs of a fixed permutation of the training set: calibration batches first, and
        latency batches cut from the same samples (repeated where the set is smaller)."""
        if state.train_data is None or len(state.train_data) == 0:
            raise ValueError("quantize: no training samples to calibrate on")
        count = max(
            self.calibration_batches * self.calibration_batch_size, max(self.timing.batch_sizes)
        )
        return fixed_samples(state, count)

    def float_model(self, state: TrainState) -> nn.Module:
        """The plain float CPU model that is quantized and measured (a collective under FSDP2):
        as an earlier stage deploys it (`state.deploy`: structured pruning's shrunk model)."""
        plain = plain_copy(state.model).eval()
        return state.deploy(plain) if state.deploy is not None else plain


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"quantize.{key}: {problem}")
