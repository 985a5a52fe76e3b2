"""One JSON object per log step in `<run dir>/metrics.jsonl`: greppable, and easy to read in tests."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from trainer.loggers.base import Logger


class JsonlLogger(Logger):
    def __init__(self, save_dir: str, filename: str = "metrics.jsonl") -> None:
        self.path = Path(save_dir) / filename
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def rewind(self, step: int) -> None:
        """Keep the rows up to `step`, rewriting the file through a temporary name. A process
        killed while writing may have left half a row at the end: it goes too."""
        self.file.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except ValueError:
                continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def flush(self) -> None:
        os.fsync(self.file.fileno())  # each row is flushed to the OS as it is written

    def finish(self) -> None:
        self.file.close()
