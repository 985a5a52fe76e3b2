"""Sweeps (`hooktrain -m ...`): a failing job is reported and the others go on; at the end a table
of every job's overrides and final metrics is written at the sweep's root and printed, and the
process exits with the number of jobs that failed (0 when all passed).

- `reports_failures` wraps the task function: in a sweep, a job's exception (or the SystemExit
  that a config or checkpoint error ends in) is logged and becomes the job's status; the job
  returns NaN, which an optimising sweeper (Optuna) takes as a failed trial.
- `SweepSummary`, a Hydra callback (registered in recipes/train.yaml), appends each job's row to
  `<sweep dir>/jobs.jsonl` where the job ran (the launcher may run jobs in other processes) and,
  in the launching process, writes `sweep_summary.md` and `sweep_summary.csv` from those rows.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

log = logging.getLogger("hooktrain")

ROWS = "jobs.jsonl"
METRICS = ("test/accuracy", "test/loss", "val/loss", "train/loss", "steps", "wall_seconds")
_failure: str | None = None  # this process's running job's error, read by on_job_end


def reports_failures(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """In a sweep, a failing job ends as a status instead of ending the sweep."""

    @functools.wraps(task)
    def job(cfg: DictConfig) -> Any:
        global _failure
        _failure = None
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return task(cfg)
        try:
            return task(cfg)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the job's status, see below
            _failure = _error_line(err)
            name = f"job {HydraConfig.get().job.num} ({HydraConfig.get().job.override_dirname})"
            # A config or checkpoint error has said its line already; anything else is a bug
            # or a crash, whose traceback belongs in the job's log.
            log.error("%s failed: %s", name, _failure, exc_info=not isinstance(err, SystemExit))
            return math.nan

    return job


def _error_line(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        # cli._exit raises it while handling the ConfigError or CheckpointError it reports.
        cause = err.__context__
        return f"exit {err.code}: {cause}" if cause is not None else f"exit {err.code}"
    return f"{type(err).__name__}: {err}"


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        (Path(config.hydra.sweep.dir) / ROWS).unlink(missing_ok=True)  # a reused sweep folder

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra = job_return.hydra_cfg.hydra
        if hydra.mode != RunMode.MULTIRUN:
            return
        summary_path = Path(hydra.runtime.output_dir) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        failure = _failure
        row = {
            "job": hydra.job.num,
            "overrides": list(job_return.overrides or []),
            **{key: summary.get(key) for key in METRICS},
            "status": f"failed: {failure}" if failure else "ok",
        }
        root = Path(hydra.sweep.dir)
        root.mkdir(parents=True, exist_ok=True)
        with (root / ROWS).open("a") as rows:  # one short line per job: an atomic append
            rows.write(json.dumps(row) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        path = root / ROWS
        lines = path.read_text().splitlines() if path.exists() else []
        rows = sorted((json.loads(line) for line in lines), key=lambda r: r["job"])
        failed = write_summary(root, rows)
        if failed:  # Hydra lets a callback's SystemExit through: the sweep's exit code
            raise SystemExit(min(failed, 125))


def write_summary(root: Path, rows: list[dict[str, Any]]) -> int:
    """Write and print the table; return how many jobs failed."""
    keys = list(dict.fromkeys(o.split("=", 1)[0] for r in rows for o in r["overrides"]))
    header = ["job", *keys, *METRICS, "status"]
    table_rows = []
    for row in rows:
        given = dict(o.split("=", 1) if "=" in o else (o, "") for o in row["overrides"])
        cells = [row["job"], *(given.get(k, "") for k in keys), *(row[m] for m in METRICS)]
        table_rows.append([_shown(cell) for cell in [*cells, row["status"]]])
    with (root / "sweep_summary.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(table_rows)
    # The Markdown and printed tables show the overrides that differ; the shared ones go above.
    shared = [
        i for i, key in enumerate(header) if key in keys and len({r[i] for r in table_rows}) == 1
    ]
    note = ", ".join(f"{header[i]}={table_rows[0][i]}" for i in shared) if table_rows else ""
    shown = [i for i in range(len(header)) if i not in shared]
    header = [header[i] for i in shown]
    table_rows = [[cells[i] for i in shown] for cells in table_rows]
    markdown = [f"Overrides of every job: {note}", ""] if note else []
    markdown += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(cells) + " |" for cells in table_rows]
    (root / "sweep_summary.md").write_text("\n".join(markdown) + "\n")
    table = Table(title=f"hooktrain sweep: {root}", caption=note or None, caption_justify="left")
    for name in header:
        table.add_column(name, overflow="fold")
    for cells in table_rows:
        table.add_row(*cells)
    Console(stderr=True).print(table)
    return sum(row["status"] != "ok" for row in rows)


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
