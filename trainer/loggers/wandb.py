"""Weights & Biases, opt-in (`+logger=wandb`; on by itself where WANDB_API_KEY is set, see
docs/loggers.md) and offline unless `logger.wandb.mode` (by default WANDB_MODE) says otherwise:
runs land in `<run dir>/wandb` and sync later with `wandb sync`. Set `logger.wandb.mode=online`
(and log in) to stream them.

One run folder is one wandb run: its id is kept in `<run dir>/wandb/run_id`, and every resumed
attempt continues that run (wandb's resume by id)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.loggers.base import Logger


class WandbLogger(Logger):
    def __init__(
        self,
        save_dir: str,
        project: str = "hooktrain",
        name: str | None = None,
        mode: str = "offline",
        tags: list[str] | None = None,
    ) -> None:
        import wandb  # imported here: a run with wandb switched off never pays for the import

        id_file = Path(save_dir) / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(
            project=project,
            name=name,
            dir=save_dir,
            mode=mode,
            tags=tags,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
            reinit="create_new",
        )
        if run_id is None:
            id_file.write_text(self.run.id + "\n")

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        self.run.finish()
