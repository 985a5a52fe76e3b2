"""TensorBoard event files under `<run dir>/tensorboard`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from trainer.loggers.base import Logger


class TensorBoardLogger(Logger):
    def __init__(self, save_dir: str, subdir: str = "tensorboard", flush_secs: int = 30) -> None:
        self.writer = SummaryWriter(log_dir=str(Path(save_dir) / subdir), flush_secs=flush_secs)

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
        self.writer.add_text("config", text, global_step=0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def finish(self) -> None:
        self.writer.close()
