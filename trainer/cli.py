"""The `hooktrain` command (also `python -m trainer`): validate -> init distributed -> build -> fit.

    hooktrain                                    # CNN on scikit-learn digits, CPU, < 1 minute
    hooktrain model=mlp optim.lr=3e-3            # switch a config group, override a value
    hooktrain experiment=mnist1d_cnn             # a preset from recipes/experiment/
    hooktrain -m optim.lr=1e-3,3e-3 model=mlp,cnn    # a sweep: one folder per job
    torchrun --nproc_per_node=2 -m trainer parallel=ddp

`hooktrain --help` lists the config groups; `hooktrain --cfg job` prints the composed config.
Bad input ends in one line and exit code 2 (config) or 3 (checkpoint); see `_exit`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import os
import re
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    CompactHydraException,
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from rich.console import Console
from rich.table import Table
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

import trainer
from trainer import run_folder, sweep
from trainer.checkpoint import CheckpointError
from trainer.checkpoint_reader import refuse_run_folder
from trainer.config import ConfigError, TrainConfig, register_schema, validate
from trainer.distributed.env import any_rank, distributed
from trainer.distributed.launch import launch
from trainer.own_code import (
    importable_cwd,
    overridden_keys,
    replace_overridden_nodes,
    with_default_targets,
)
from trainer.throughput import SUMMARY_NOTE, human_flops, throughput_summary

if TYPE_CHECKING:
    import torch

    from trainer.data.datasets import DataSplits
    from trainer.loop import Trainer

STARTED = trainer.STARTED
EXIT_CODES = {"config": 2, "checkpoint": 3}
WANDB_ON = "+logger=wandb"  # what a user who has configured wandb gets (see configured_wandb)
log = logging.getLogger("hooktrain")


def recipes_dir() -> Path:
    """The Hydra config tree: inside the installed package, or `recipes/` beside it in a checkout."""
    installed = Path(trainer.__file__).parent / "recipes"
    return installed if installed.is_dir() else Path(trainer.__file__).parent.parent / "recipes"


# `hydra.run.dir: ${run_folder:outputs}`: cached, so a job resolves its folder once.
OmegaConf.register_new_resolver(
    "run_folder", run_folder.new_run_folder, use_cache=True, replace=True
)
register_schema()


def run(
    cfg: DictConfig,
    run_dir: Path,
    started: float = STARTED,
    model: torch.nn.Module | None = None,
    splits: DataSplits | None = None,
) -> dict[str, Any]:
    """Train, test and summarise one job in this process (one rank of it under torchrun).
    Returns the summary, also written to summary.json. `model` and `splits`, when given (the
    Python API), are used instead of building the config's."""
    typed = validate(cfg)  # before any process group starts
    if typed.resume not in (None, "auto"):
        refuse_run_folder(Path(typed.resume))  # a run folder named instead of a checkpoint
    with distributed(typed.device, typed.parallel.backend, typed.parallel.timeout_s) as env:
        from trainer.build import build_trainer  # heavy imports after validation: errors come fast

        try:
            fit_trainer, facts = build_trainer(typed, env, run_dir, model, splits)
        except ConfigError:
            raise
        except ValueError as err:  # what only building can check: the Trainer's own refusals
            raise ConfigError(str(err)) from None
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if env.is_global_zero:  # the run is known to start: now it is on record
            run_folder.record_config(run_dir, resolved)
            # Once, on rank 0, in the console log: what config.yaml holds.
            yaml = OmegaConf.to_yaml(resolved).rstrip("\n")
            log.info("config (also in %s):\n%s", run_dir / "config.yaml", yaml)
            if resolved["logger"].get("wandb") and wandb_key_set():
                log.info("wandb logs this run: WANDB_API_KEY is set (docs/loggers.md)")
        summary_path = run_dir / "summary.json"
        try:  # the loggers are closed (files flushed, wandb finished) even when the run fails
            fit_trainer.logger.log_config(resolved)
            state = fit_trainer.fit()
            # No step in this process: a resume of a finished run, whose summary stays as it is.
            # Every rank ran the same steps, so every rank takes the same branch.
            if fit_trainer.first_step_done is None and summary_path.exists():
                if env.is_global_zero:
                    done = f"{run_dir} had already trained to step {state.step}"
                    print(
                        f"hooktrain: {done}; nothing to do (its summary.json is kept)",
                        file=sys.stderr,
                    )
                return json.loads(summary_path.read_text())
            # The weights as one plain file; every rank calls it (it gathers shards).
            from trainer.export import write_final_weights

            write_final_weights(fit_trainer, run_dir)
            summary = _summarise(fit_trainer, facts, started, run_dir)
            numbers = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
            fit_trainer.logger.log_metrics(numbers, state.step)
        finally:
            fit_trainer.logger.finish()
        if env.is_global_zero:
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
            _print_summary(summary)
        return summary


def _summarise(
    fit_trainer: Trainer, facts: dict[str, int], started: float, run_dir: Path
) -> dict[str, Any]:
    """The fitted run's summary, after its test pass (unless preempted)."""
    state, env = fit_trainer.state, fit_trainer.env
    metrics = dict(state.metrics)
    # Preempted (a signal on any rank): every rank skips the test and exits promptly.
    preempted = any_rank([fit_trainer.preempted_by is not None], env.device)[0]
    if fit_trainer.cfg.test_after_fit and not preempted:
        metrics.update(fit_trainer.test())
    summary = {
        # the log windows' throughput is in the logs; the summary's is steady-state
        **{
            k: v
            for k, v in metrics.items()
            if k.startswith(("train/", "val/", "test/", "pruning/", "compression/"))
            and k != "train/samples_per_second"
        },
        **throughput_summary(fit_trainer.samples_per_second(), env.world_size, facts, env.device),
    }
    if fit_trainer.first_step_done is not None:  # None: no step ran in this process
        summary["seconds_to_first_step"] = fit_trainer.first_step_done - started
    summary.update(
        wall_seconds=time.time() - started,
        world_size=env.world_size,
        parameters=facts["parameters"],
        steps=state.step,
        epochs=state.epoch,
        stop_reason=state.stop_reason or "budget reached",
        run_dir=str(run_dir),
    )
    if fit_trainer.cfg.checkpoint.best_monitor and (best := fit_trainer.checkpointer.best()):
        summary["best_checkpoint"] = str(best)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    caption = SUMMARY_NOTE if "train_step_samples_per_second" in summary else None
    table = Table(
        title="hooktrain summary", show_header=False, caption=caption, caption_justify="left"
    )
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a long run_dir wraps instead of being cut
    for key, value in summary.items():
        table.add_row(key, _shown(key, value))
    Console(stderr=True).print(table)


def _shown(key: str, value: Any) -> str:
    if key.endswith("flops_per_sample"):
        return human_flops(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def wandb_key_set() -> bool:
    """Whether the user has configured wandb for this shell or job: WANDB_API_KEY is set (and
    WANDB_MODE does not switch wandb off)."""
    return bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") != "disabled"


def configured_wandb(overrides: Sequence[str], own_config: bool = False) -> list[str]:
    """`overrides` with `+logger=wandb` added where the user has configured wandb
    (`wandb_key_set`) and left the choice of loggers to the defaults: no `logger` override, and
    hooktrain's own primary config (`own_config`: the user's names its own loggers). wandb is
    opt-in because its start-up costs a short run a third of its training speed
    (docs/loggers.md); a user with a key has opted in. The override is recorded in the run's
    .hydra/overrides.yaml and shows in the printed config."""
    keys = [*overridden_keys(overrides), *(o[1:] for o in overrides if o.startswith("~"))]
    chosen = any(key == "logger" or key.startswith("logger@") for key in keys)
    if own_config or chosen or not wandb_key_set():
        return list(overrides)
    return [*overrides, WANDB_ON]


def _names_own_config(argv: Sequence[str]) -> bool:
    """Whether Hydra's command line names a primary config other than hooktrain's own."""
    return any(
        a in ("--config-name", "-cn") or a.startswith(("--config-name=", "-cn=")) for a in argv
    )


# ----------------------------------------------------------------------------- jobs
def _launched_job(
    container: dict[str, Any],
    run_dir: str,
    started: float,
    job_logging: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One rank of a job that `hooktrain` launched itself (parallel.nproc_per_node > 1).
    `job_logging`: the launching process's Hydra logging config, which a spawned process does
    not inherit (without it the loop's INFO lines, "resumed from ..." among them, are lost)."""
    if job_logging is not None:
        _log_like_a_torchrun_rank(job_logging)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), container)
    try:
        return run(cfg, Path(run_dir), started)
    except (ConfigError, CheckpointError) as err:
        _exit(err, say=False, record=True)  # the launching process says it, once


def _log_like_a_torchrun_rank(job_logging: dict[str, Any]) -> None:
    """Hydra's logging config, each file handler writing this rank's own log
    (`hooktrain_rank<N>.log`, as under torchrun)."""
    rank = os.environ.get("RANK", "0")
    for handler in job_logging.get("handlers", {}).values():
        if "filename" in handler:
            handler["filename"] = re.sub(r"_rank\d+\.log$", f"_rank{rank}.log", handler["filename"])
    logging.config.dictConfig(job_logging)


def _job_logging() -> dict[str, Any] | None:
    """The running Hydra job's logging config, resolved (None outside a Hydra job)."""
    if not HydraConfig.initialized():
        return None
    return OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)


_job_started = STARTED  # each job of a sweep times itself from the end of the previous one


@hydra.main(config_path=str(recipes_dir()), config_name="train", version_base="1.3")
@sweep.reports_failures  # in a sweep, a failing job is reported and the others go on
def _hydra_entry(cfg: DictConfig) -> float | None:
    global _job_started
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # Every rank of a torchrun job sees the same config: rank 0 alone reports and holds the folder.
    rank_zero = os.environ.get("RANK", "0") == "0"
    made_for_this_command = rank_zero and run_folder.holds_nothing_yet(run_dir)
    try:
        summary = run_in_folder(cfg, run_dir, _job_started, record_command=True)
    except (ConfigError, CheckpointError) as err:
        if made_for_this_command:
            run_folder.discard(run_dir)
        _exit(err, say=rank_zero, record=isinstance(err, CheckpointError))
    finally:
        _job_started = time.time()
    # A sweeper that optimises (e.g. Optuna) reads the returned value.
    return summary.get("val/loss")


def run_in_folder(
    cfg: DictConfig,
    run_dir: Path,
    started: float,
    record_command: bool = False,
    model: torch.nn.Module | None = None,
    splits: DataSplits | None = None,
) -> dict[str, Any]:
    """Validate `cfg` and run its job in `run_dir`, held by rank 0 for the job's life (here, or
    in `parallel.nproc_per_node` local processes). `record_command`: write Hydra's record of the
    command (.hydra/) too."""
    rank_zero = os.environ.get("RANK", "0") == "0"
    with_default_targets(cfg)
    nproc = int(cfg.parallel.nproc_per_node)
    launching = nproc > 1 and "WORLD_SIZE" not in os.environ
    validate(cfg, world_size=nproc if launching else None)
    if launching and (model is not None or splits is not None):
        raise ConfigError(
            "parallel.nproc_per_node: a model or data given from Python trains in this process; "
            "start the script with torchrun instead"
        )
    with run_folder.hold(run_dir) if rank_zero else contextlib.nullcontext():
        if rank_zero:
            run_folder.refuse_other_run(run_dir, cfg.resume)
            if record_command:
                run_folder.record_command(run_dir, cfg)
        if launching:
            container = OmegaConf.to_container(cfg, resolve=True)
            return _launch(container, nproc, str(run_dir))
        return run(cfg, run_dir, started, model, splits)


def _launch(container: dict[str, Any], nproc: int, run_dir: str) -> dict[str, Any]:
    """Run the job in `nproc` local processes; a rank that ended with hooktrain's own error (see
    `_exit`) left its one line in torchrun's error file: say that line and exit with its code."""
    try:
        codes = tuple(EXIT_CODES.values())
        return launch(
            _launched_job,
            nproc,
            container,
            run_dir,
            _job_started,
            _job_logging(),
            quiet_exits=codes,
        )[0]
    except ChildFailedError as err:
        for _, failure in sorted(err.failures.items()):
            if failure.exitcode in codes and failure.message:
                print(failure.message, file=sys.stderr)
                sys.exit(failure.exitcode)
        raise


def _exit(err: ConfigError | CheckpointError, say: bool, record: bool = False) -> NoReturn:
    """End with one line naming what is wrong, and exit code 2 (config) or 3 (checkpoint).

    `record`: also write the line into this worker's torchrun error file, where hooktrain's own
    launcher reads it, and where torchrun's failure report shows it for a rank that did not say
    it (a checkpoint error may be one rank's alone; a config error is every rank's)."""
    kind = "config" if isinstance(err, ConfigError) else "checkpoint"
    line = f"hooktrain: {kind} error: {err}"
    if record and (error_file := os.environ.get("TORCHELASTIC_ERROR_FILE")):
        Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    if say:
        print(line, file=sys.stderr)
    sys.exit(EXIT_CODES[kind])


# ----------------------------------------------------------------------------- entry point
@record  # under torchrun, a failing rank's traceback lands in the agent's error report
def main() -> None:
    """`hooktrain`. Hydra is made to raise rather than report, so that a config it cannot
    compose ends like every other config error; any other error gets Hydra's short report."""
    if sys.argv[1:2] in (["evaluate"], ["predict"], ["export"]):  # a run's model after the fit
        from trainer import commands

        commands.main(sys.argv[1:])
        return
    asked_full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    importable_cwd()
    overrides = replace_overridden_nodes(sys.argv[1:])
    sys.argv[1:] = configured_wandb(overrides, own_config=_names_own_config(overrides))
    try:
        _hydra_entry()
        return
    except KeyboardInterrupt:  # Ctrl-C outside fit, or a second one inside it (the first saves)
        print("hooktrain: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - reported below, as Hydra would
        error = err
    finally:
        if asked_full_error is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = asked_full_error
    if isinstance(error, (ConfigCompositionException, OverrideParseException)):
        _exit(ConfigError(composition_message(error)), say=os.environ.get("RANK", "0") == "0")
    if asked_full_error == "1":
        raise error
    # Hydra's short report: a message, or the traceback from the task function down.
    if isinstance(error, CompactHydraException):
        cause = error.__cause__
        causes = [cause] if isinstance(cause, OmegaConfBaseException) else []
        print(error, *causes, sep="\n", file=sys.stderr)
    else:
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_name != "run_job":
            tb = tb.tb_next
        traceback.print_exception(type(error), error, tb.tb_next if tb else error.__traceback__)
    print(
        "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.",
        file=sys.stderr,
    )
    sys.exit(1)


def composition_message(err: ConfigCompositionException | OverrideParseException) -> str:
    """Hydra's several lines as one: for an override of a key the config lacks, the key and the
    keys its section takes (Hydra's hint, `+key=...`, would only add the typo)."""
    cause = err.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        section, _, _ = cause.full_key.rpartition(".")
        keys = [k for k in cause.parent_node or () if k not in ("hydra", "_target_")]
        target = (cause.parent_node or {}).get("_target_")
        where = f" for {target}" if target else ""
        takes = f"{section or 'the config'} takes: {', '.join(keys)}"
        return f"{cause.full_key}: unknown key{where} ({takes})"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, OverrideParseException):
        return f"{err.override}: {lines[0]}"
    if isinstance(err, MissingConfigException) and err.options:
        return f"{lines[0]} (options: {', '.join(err.options)})"
    return "; ".join(lines)
