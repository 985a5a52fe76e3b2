"""TensorBoard event files under `<run dir>/tensorboard`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams, scalar

from trainer.loggers.base import Logger


class TensorBoardLogger(Logger):
    def __init__(self, save_dir: str, subdir: str = "tensorboard", flush_secs: int = 30) -> None:
        self.log_dir = str(Path(save_dir) / subdir)
        self.flush_secs = flush_secs
        self.writer = SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs)
        self.final: dict[str, float] = {}  # the run's summary/... metrics, for the HParams tab

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
        self.writer.add_text("config", text, global_step=0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # One event holding every scalar of the step, as `add_scalar` would write one each: each
        # event costs a checksum in pure Python on the writer's thread.
        values = [value for name, v in metrics.items() for value in scalar(name, v).value]
        self.final |= {k: v for k, v in metrics.items() if k.startswith("summary/")}
        self.writer.file_writer.add_summary(Summary(value=values), global_step=step)

    def rewind(self, step: int) -> None:
        # TensorBoard's own way: a new event file whose start marks the events of an earlier
        # attempt from `purge_step` on as superseded.
        self.writer.close()
        self.writer = SummaryWriter(
            log_dir=self.log_dir, flush_secs=self.flush_secs, purge_step=step + 1
        )

    def flush(self) -> None:
        self.writer.flush()

    def finish(self) -> None:
        if self.final:  # HParams tab: this run's overrides beside its final metrics
            for event in hparams(_overrides(), self.final):
                self.writer.file_writer.add_summary(event)
        self.writer.close()


def _overrides() -> dict[str, str]:
    """The job's command-line overrides (a sweep's varied values), where Hydra started it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    pairs = (o.split("=", 1) for o in HydraConfig.get().overrides.task if "=" in o)
    return {key: value for key, value in pairs}
