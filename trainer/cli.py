"""The `hooktrain` command (also `python -m trainer`): validate -> init distributed -> build -> fit.

    hooktrain                                    # CNN on scikit-learn digits, CPU, < 1 minute
    hooktrain model=mlp optim.lr=3e-3            # switch a config group, override a value
    hooktrain experiment=mnist1d_cnn             # a preset from recipes/experiment/
    hooktrain -m optim.lr=1e-3,3e-3 model=mlp,cnn    # a sweep: one folder per job
    torchrun --nproc_per_node=2 -m trainer parallel=ddp

`hooktrain --help` lists the config groups; `hooktrain --cfg job` prints the composed config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.distributed.elastic.multiprocessing.errors import record

import trainer
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, TrainConfig, register_schema, validate
from trainer.distributed.env import any_rank, distributed
from trainer.distributed.launch import launch
from trainer.throughput import throughput_summary

log = logging.getLogger("hooktrain")
STARTED = trainer.STARTED


def recipes_dir() -> Path:
    """The Hydra config tree: inside the installed package, or `recipes/` beside it in a checkout."""
    installed = Path(trainer.__file__).parent / "recipes"
    return installed if installed.is_dir() else Path(trainer.__file__).parent.parent / "recipes"


def _run_id() -> str:
    """The run folder's name, the same on every rank of a job.

    torchrun shares TORCHELASTIC_RUN_ID with all ranks (`--standalone` draws a fresh one, or set
    `--rdzv-id`). Without either it is "none" for every job, so the ranks fall back to their
    launcher's process id, which they share on one node. A plain run uses the clock.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun-{os.getppid()}"
    return datetime.now().strftime("%H-%M-%S")


OmegaConf.register_new_resolver("run_id", _run_id, use_cache=True, replace=True)
register_schema()


def run(cfg: DictConfig, run_dir: Path, started: float = STARTED) -> dict[str, Any]:
    """Train, test and summarise one job in this process (one rank of it under torchrun).
    Returns the summary, also written to summary.json."""
    typed = validate(cfg)  # before any process group starts
    with distributed(typed.device, typed.parallel.backend, typed.parallel.timeout_s) as env:
        from trainer.build import build_trainer  # heavy imports after validation: errors come fast

        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if env.is_global_zero:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        fit_trainer, facts = build_trainer(typed, env, run_dir)
        try:  # the loggers are closed (files flushed, wandb finished) even when the run fails
            fit_trainer.logger.log_config(resolved)
            state = fit_trainer.fit()
            metrics = dict(state.metrics)
            # Preempted (a signal on any rank): every rank skips the test and exits promptly.
            preempted = any_rank([fit_trainer.preempted_by is not None], env.device)[0]
            if typed.test_after_fit and not preempted:
                metrics.update(fit_trainer.test())
            summary = {
                # the last log window's throughput is in the logs; the summary's is steady-state
                **{
                    k: v
                    for k, v in metrics.items()
                    if k.startswith(("train/", "val/", "test/", "pruning/"))
                    and k != "train/samples_per_second"
                },
                **throughput_summary(
                    fit_trainer.samples_per_second(), env.world_size, facts, env.device
                ),
                "seconds_to_first_step": (fit_trainer.first_step_done or time.time()) - started,
                "wall_seconds": time.time() - started,
                "world_size": env.world_size,
                "parameters": facts["parameters"],
                "steps": state.step,
                "epochs": state.epoch,
                "stop_reason": state.stop_reason or "budget reached",
                "run_dir": str(run_dir),
            }
            if typed.checkpoint.best_monitor and (best := fit_trainer.checkpointer.best()):
                summary["best_checkpoint"] = str(best)
            numbers = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
            fit_trainer.logger.log_metrics(numbers, state.step)
        finally:
            fit_trainer.logger.finish()
        if env.is_global_zero:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            _print_summary(summary)
        return summary


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="hooktrain summary", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console(stderr=True).print(table)


def _launched_job(container: dict[str, Any], run_dir: str, started: float) -> dict[str, Any]:
    """One rank of a job that `hooktrain` launched itself (parallel.nproc_per_node > 1)."""
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), container)
    return run(cfg, Path(run_dir), started)


_job_started = STARTED  # each job of a sweep times itself from the end of the previous one


@hydra.main(config_path=str(recipes_dir()), config_name="train", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> float | None:
    global _job_started
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        nproc = int(cfg.parallel.nproc_per_node)
        launching = nproc > 1 and "WORLD_SIZE" not in os.environ
        validate(cfg, world_size=nproc if launching else None)
        if launching:
            container = OmegaConf.to_container(cfg, resolve=True)
            summary = launch(_launched_job, nproc, container, str(run_dir), _job_started)[0]
        else:
            summary = run(cfg, run_dir, _job_started)
    except ConfigError as err:
        print(f"hooktrain: config error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as err:
        print(f"hooktrain: checkpoint error: {err}", file=sys.stderr)
        sys.exit(3)
    finally:
        _job_started = time.time()
    # A sweeper that optimises (e.g. Optuna) reads the returned value.
    return summary.get("val/loss")


@record  # under torchrun, a failing rank's traceback lands in the agent's error report
def main() -> None:
    _hydra_entry()
