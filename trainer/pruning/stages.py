"""The pruning callback's rows in the run's compression report, and its exported model.

Each row is measured by rank 0 (`trainer.compress.report.measure_stage`) on a plain full-weight
copy of the model, from a fixed sample of the training set, and broadcast, so that every rank
adds and logs the same row. A pruned stage is measured as deployed: the callback's `deploy`
gives the model to measure and writes its artifact, `pruned_model.pt` in the report folder (or in
a temporary folder, to measure its size, when nothing is exported).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from trainer.compress.report import CompressionReport, Timing, measure_stage
from trainer.compress.samples import evaluated, fixed_samples
from trainer.distributed.env import broadcast_object
from trainer.pruning.shrink import plain_copy
from trainer.state import TrainState

MODEL_FILE = "pruned_model.pt"

# plain model -> (the model as deployed, a function writing its artifact to a path)
Deploy = Callable[[nn.Module], tuple[nn.Module, Callable[[Path], Path]]]


class Stages:
    """Rows and artifact. `timing` None: no rows (the artifact is still exported); `export_dir`:
    where `pruned_model.pt` goes (None: not kept); `report_dir`: where the report is written."""

    def __init__(self, timing: Timing | None, export_dir: Path | None, report_dir: Path | None):
        self.timing = timing
        self.export_dir = export_dir
        self.report_dir = report_dir

    def add(
        self,
        state: TrainState,
        stage: str,
        note: str,
        deploy: Deploy | None = None,
        only_first: bool = False,
    ) -> None:
        """Measure the model as it is now as the `stage` row (`deploy` None: as it is). Every rank
        calls it; accuracy through `state.measure`. `only_first`: only into an empty report."""
        if self.timing is None:
            return
        report = CompressionReport.of(state)
        if report.row(stage) is not None or (only_first and report.rows):
            return
        accuracy = evaluated(state)
        plain = plain_copy(state.model).eval()  # a collective under FSDP2: every rank
        samples = fixed_samples(state, max(self.timing.batch_sizes), plain)

        def measure() -> dict[str, Any]:
            if deploy is None:
                return measure_stage(
                    stage, plain, samples, accuracy=accuracy, timing=self.timing, note=note
                )
            with tempfile.TemporaryDirectory() as scratch:
                deployed, artifact = self._write(deploy, plain, Path(scratch))
                kept = self.export_dir is not None
                return measure_stage(
                    stage,
                    deployed,
                    samples,
                    accuracy=accuracy,
                    artifact=artifact,
                    timing=self.timing,
                    note=f"{note}, {artifact.name}" if kept else note,
                )

        report.add(state, on_rank_zero(state, measure))

    def export(self, state: TrainState, deploy: Deploy) -> None:
        """Write the artifact of the model as it is now (rank 0; every rank calls it)."""
        plain = plain_copy(state.model).eval()  # a collective under FSDP2: every rank

        def write() -> None:
            if self.export_dir is not None:
                self._write(deploy, plain, self.export_dir)

        on_rank_zero(state, write)

    def write_report(self, state: TrainState) -> None:
        """Rank 0 writes the report's files, if it has rows and there is a folder."""
        report = state.compression
        if state.is_global_zero and self.report_dir is not None and report and report.rows:
            report.write(self.report_dir, state.step)

    def _write(self, deploy: Deploy, plain: nn.Module, scratch: Path) -> tuple[nn.Module, Path]:
        deployed, write = deploy(plain)
        return deployed, write((self.export_dir or scratch) / MODEL_FILE)


def on_rank_zero(state: TrainState, work: Callable[[], Any]) -> Any:
    """`work()` on rank 0, its result on every rank; its ValueError is raised on every rank (no
    rank is left waiting in a collective)."""
    box: Any = None
    if state.is_global_zero:
        try:
            box = ("ok", work())
        except ValueError as err:
            box = ("error", str(err))
    kind, value = broadcast_object(box)
    if kind == "error":
        raise ValueError(value)
    return value
