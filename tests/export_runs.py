"""A fitted run folder for the evaluate / predict / export tests, built in-process: its
config.yaml (as the CLI records it), a final checkpoint and model.pt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tests.helpers import make_config, make_trainer
from trainer import export
from trainer.loop import Trainer


def fitted_run(run_dir: Path, callbacks: tuple = (), **overrides: Any) -> Trainer:
    """Fit `make_config(**overrides)` (with a final checkpoint) in `run_dir`; write its
    config.yaml before the fit, as `hooktrain` does, and model.pt after it, as `hooktrain` does."""
    overrides.setdefault("checkpoint", {"save_final": True, "best_monitor": "val/loss"})
    cfg = make_config(**overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    trainer = make_trainer(run_dir, callbacks=callbacks, **overrides)
    trainer.fit()
    export.write_final_weights(trainer, run_dir)
    return trainer
