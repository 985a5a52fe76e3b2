"""One JSON object per log step in `<run dir>/metrics.jsonl`: greppable, and easy to read in tests."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from trainer.loggers.base import Logger


class JsonlLogger(Logger):
    def __init__(self, save_dir: str, filename: str = "metrics.jsonl") -> None:
        self.file = open(Path(save_dir) / filename, "a", encoding="utf-8")  # noqa: SIM115

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()
