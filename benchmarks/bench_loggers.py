"""What each logger costs the training loop: the real CLI, one fresh process per run.

    python -m benchmarks.bench_loggers --threads 1            # ~4 minutes on 2 quiet CPU cores
    python -m benchmarks.bench_loggers --threads 1 --configs tensorboard,wandb,jsonl \
        --mitigations --breakdown                             # wandb settings, ~6 minutes
    python -m benchmarks.bench_loggers --quick --configs wandb --breakdown   # smoke run

Jobs: the default job (`hooktrain` with no overrides: the CNN on scikit-learn's digits, 15
epochs, validation each epoch, test after fit) and the same with `model=mlp`, whose steps are
half as long. Each runs with `logger=none` (the reference) and the logger lists named in
`--configs` (`LOGGERS`); `--mitigations` adds `[tensorboard, wandb, jsonl]` with each way to make
wandb cheaper in `MITIGATIONS` (wandb settings go through wandb's own environment variables, so
the code measured is the code users run). wandb runs offline.

The configurations alternate run by run (A B C D A B C D ...) for `--repeats` rounds: each round
meets the machine's load of its moment, each configuration's ratio to `logger=none` is taken
within its round, and the table gives the median over rounds. Torch keeps its default thread
count, as for a user, unless `--threads N` (OMP_NUM_THREADS) says otherwise.

Per run:
- samples/s over the fit, from a callback (`StepClock`) noting the time at the end of each step:
  every step-to-step interval inside an epoch (the one across validation and the epoch start
  left out), so it counts what surrounds `train_step` too (the logger hand-off, data, hooks). The
  loggers start in the background thread during the first steps: their start-up is counted.
  The same over the second half of the fit's steps, and the trainer's own figure (summary.json's
  train_step_samples_per_second: `train_step` alone);
- the process's wall time and CPU seconds, and, sampled from /proc while it runs, the CPU
  seconds of its threads but the main one (the loggers' thread, wandb's own threads) and of its
  child processes (wandb's `wandb-core` service and `wandb-symon` monitor).

`--breakdown` adds wandb alone, in a fresh process per setting: the wall and CPU time of
`import wandb`, `wandb.init`, one `run.log` and `run.finish`, and its service's CPU while idle.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_loggers.py`

from benchmarks.common import (  # noqa: E402
    REPO,
    load_average,
    machine,
    markdown_table,
    median,
    wait_for_quiet,
)
from trainer.callbacks.base import Callback  # noqa: E402

JOBS = {"default job (cnn)": [], "model=mlp": ["model=mlp"]}
REFERENCE = "none"
WITH_WANDB = "tensorboard,wandb,jsonl"
LOGGERS = {"none": "logger=none"} | {
    name: f"logger=[{name}]" for name in ("jsonl", "tensorboard,jsonl", WITH_WANDB, "wandb")
}
# Ways to keep wandb on at a lower cost: wandb.Settings fields (wandb/sdk/wandb_settings.py), set
# through wandb's environment variables (WANDB_<NAME>, or WANDB__<NAME> for a field x_<name>), and
# fewer log steps. --configs name: (what it sets, overrides, environment).
MITIGATIONS = {
    "no-stats": ("x_disable_stats=True", [], {"WANDB__DISABLE_STATS": "true"}),
    "no-meta": ("x_disable_meta=True", [], {"WANDB__DISABLE_META": "true"}),
    "lean": (
        "x_disable_stats, x_disable_meta, x_save_requirements=False, disable_git, disable_code",
        [],
        {
            "WANDB__DISABLE_STATS": "true",
            "WANDB__DISABLE_META": "true",
            "WANDB__SAVE_REQUIREMENTS": "false",
            "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true",
        },
    ),
    "log-every-100": ("log_every_steps=100", ["log_every_steps=100"], {}),
}


def configurations(names: Sequence[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Table label -> (overrides, extra environment) of each named configuration, the reference
    (`logger=none`) first."""
    out = {LOGGERS[REFERENCE]: ([LOGGERS[REFERENCE]], {})}
    for name in names:
        if name in LOGGERS:
            out[LOGGERS[name]] = ([LOGGERS[name]], {})
        else:
            sets, overrides, env = MITIGATIONS[name]
            out[f"{LOGGERS[WITH_WANDB]}, {sets}"] = ([LOGGERS[WITH_WANDB], *overrides], env)
    return out


SERVICE = ("wandb-core", "wandb-symon")  # wandb's processes, children of the training process
QUIET = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


class StepClock(Callback):
    """Notes (epoch, samples seen, time) at the end of every step; writes them to `report` (a
    path) at fit end. Added to the CLI's callbacks with `+callbacks.clock._target_=...`."""

    def __init__(self, report: str) -> None:
        self.report = report
        self.ends: list[tuple[int, int, float]] = []

    def on_step_end(self, state: Any) -> None:
        self.ends.append((state.epoch, state.samples_seen, time.perf_counter()))

    def on_fit_end(self, state: Any) -> None:
        Path(self.report).write_text(json.dumps(self.ends))


def fit_samples_per_second(ends: Sequence[Sequence[float]]) -> float:
    """Samples per second over the step-to-step intervals inside each epoch."""
    pairs = [(a, b) for a, b in zip(ends, ends[1:], strict=False) if a[0] == b[0]]
    return sum(b[1] - a[1] for a, b in pairs) / sum(b[2] - a[2] for a, b in pairs)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
            found += kids
            todo += kids
    return found


def _cpu_seconds(task: str) -> tuple[str, float] | None:
    """(name, user + system CPU seconds) of a process ("<pid>") or thread ("<pid>/task/<tid>"),
    from its /proc/<task>/stat; None once it has ended."""
    try:
        stat = Path(f"/proc/{task}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cli(overrides: Sequence[str], env: dict[str, str], every_s: float = 0.2) -> dict[str, Any]:
    """One `python -m trainer` run in a fresh process; its figures (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        report, run_dir = Path(tmp) / "steps.json", Path(tmp) / "run"
        command = [
            sys.executable,
            "-m",
            "trainer",
            *overrides,
            f"hydra.run.dir={run_dir}",
            "checkpoint.save_final=false",
            "allowed_targets=[trainer.,torch.optim.,torch.nn.,benchmarks.]",
            "+callbacks.clock._target_=benchmarks.bench_loggers.StepClock",
            f"+callbacks.clock.report={report}",
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        stderr = open(Path(tmp) / "stderr", "w+")  # noqa: SIM115 (read after the run)
        proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        service: dict[int, float] = {}  # the last reading of each wandb process
        threads: dict[int, float] = {}  # ... and of each thread of the run but the main one
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                reading = _cpu_seconds(f"{pid}")
                if reading and reading[0].startswith(SERVICE):  # names are cut to 15 characters
                    service[pid] = reading[1]
            for task in Path(f"/proc/{proc.pid}/task").glob("*"):
                if int(task.name) != proc.pid and (
                    reading := _cpu_seconds(f"{proc.pid}/task/{task.name}")
                ):
                    threads[int(task.name)] = reading[1]
            time.sleep(every_s)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stderr.seek(0)
        errors = stderr.read()[-3000:]
        stderr.close()
        if proc.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{errors}")
        summary = json.loads((run_dir / "summary.json").read_text())
        ends = json.loads(report.read_text())
        return {
            "fit": fit_samples_per_second(ends),
            "second_half": fit_samples_per_second(ends[len(ends) // 2 :]),
            "train_step": summary["train_step_samples_per_second"],
            "wall": wall,
            "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "threads_cpu": sum(threads.values()),
            "service_cpu": sum(service.values()),
        }


def alternate(
    job: list[str],
    configs: dict[str, tuple[list[str], dict[str, str]]],
    repeats: int,
    env: dict[str, str],
) -> dict[str, list[dict[str, Any]]]:
    """Each configuration (overrides, extra environment) once per round, in turn, `repeats`
    rounds; each configuration's runs in round order."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for round_ in range(repeats):
        for name, (overrides, extra_env) in configs.items():
            figures = run_cli([*job, *overrides], {**env, **extra_env})
            results[name].append(figures)
            print(
                f"  round {round_ + 1} {name}: {figures['fit']:.0f} samples/s, "
                f"{figures['wall']:.1f} s, CPU {figures['cpu']:.1f} s, "
                f"threads {figures['threads_cpu']:.2f} s, wandb {figures['service_cpu']:.2f} s",
                file=sys.stderr,
            )
    return results


HEADERS = [
    "job",
    "loggers",
    "samples/s over the fit",
    "ratio to logger=none",
    "range over rounds",
    "2nd half of the fit: samples/s, ratio",
    "train_step samples/s (summary.json), ratio",
    "wall s",
    "CPU s: process / its other threads / wandb service",
]


def rows(job: str, results: dict[str, list[dict[str, Any]]]) -> list[list[str]]:
    """Table rows: medians over rounds; ratios to `logger=none` within each round."""
    reference = next(iter(results.values()))  # `configurations` puts logger=none first
    out = []
    for name, runs in results.items():

        def ratios(key: str, runs: list[dict[str, Any]] = runs) -> list[float]:
            return [run[key] / ref[key] for run, ref in zip(runs, reference, strict=True)]

        fit, half, step = ratios("fit"), ratios("second_half"), ratios("train_step")
        out.append(
            [
                job,
                name,
                f"{median([r['fit'] for r in runs]):.0f}",
                f"**{median(fit):.3f}x**",
                f"{min(fit):.2f}-{max(fit):.2f}",
                f"{median([r['second_half'] for r in runs]):.0f}, {median(half):.3f}x",
                f"{median([r['train_step'] for r in runs]):.0f}, {median(step):.3f}x",
                f"{median([r['wall'] for r in runs]):.1f}",
                f"{median([r['cpu'] for r in runs]):.1f} / "
                f"{median([r['threads_cpu'] for r in runs]):.2f} / "
                f"{median([r['service_cpu'] for r in runs]):.2f}",
            ]
        )
    return out


# ------------------------------------------------------------------------------ wandb alone
def _timed(work: Any) -> tuple[Any, float, float]:
    """work()'s result, wall seconds, and this process's CPU seconds (all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def breakdown_child(save_dir: str, idle_s: float, log_calls: int) -> dict[str, float]:
    """In this (fresh) process, with the wandb settings from the environment: the wall and CPU
    time of `import wandb`, of starting `WandbLogger` (`wandb.init`), of `log_calls` calls of its
    `log_metrics` (`run.log`) and of `finish`, and the CPU time its service processes take."""
    _, import_s, import_cpu = _timed(lambda: importlib.import_module("wandb"))
    from trainer.loggers.wandb import WandbLogger

    logger, init_s, init_cpu = _timed(lambda: WandbLogger(save_dir))
    service = _descendants(os.getpid())

    def service_cpu() -> float:
        readings = (_cpu_seconds(f"{pid}") for pid in service)
        return sum(r[1] for r in readings if r and r[0].startswith(SERVICE))

    at_init = service_cpu()
    time.sleep(idle_s)
    idle_rate = (service_cpu() - at_init) / idle_s
    metrics = {"train/loss": 0.5, "train/samples_per_second": 1e4, "lr": 1e-3, "epoch": 1.0}
    cpu_before, started = service_cpu(), time.perf_counter()

    def log() -> None:
        for step in range(log_calls):
            logger.log_metrics(metrics, step)

    _, log_s, log_cpu = _timed(log)
    time.sleep(min(idle_s, 2.0))  # run.log only queues: let the service write what it was sent
    service_for_logs = service_cpu() - cpu_before - idle_rate * (time.perf_counter() - started)
    _, finish_s, _ = _timed(logger.finish)
    return {
        "import_s": import_s,
        "import_cpu": import_cpu,
        "init_s": init_s,
        "init_cpu": init_cpu,
        "service_cpu_at_init": at_init,
        "service_cpu_per_idle_s": idle_rate,
        "log_ms": 1000 * log_s / log_calls,
        "log_cpu_ms": 1000 * log_cpu / log_calls,
        "service_ms_per_log": 1000 * service_for_logs / log_calls,
        "finish_s": finish_s,
    }


def breakdown(settings: dict[str, dict[str, str]], env: dict[str, str], idle_s: float) -> str:
    """`breakdown_child` in a fresh process for each setting (name -> extra environment)."""
    table = []
    for name, extra_env in settings.items():
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_loggers", "--breakdown-child", tmp]
                + ["--idle-s", str(idle_s)],
                cwd=REPO,
                env={**env, **extra_env},
                capture_output=True,
                text=True,
                check=True,
            )
        f = json.loads(done.stdout.splitlines()[-1])
        table.append(
            [
                name,
                f"{f['import_s']:.2f} / {f['import_cpu']:.2f}",
                f"{f['init_s']:.2f} / {f['init_cpu']:.2f} / {f['service_cpu_at_init']:.2f}",
                f"{100 * f['service_cpu_per_idle_s']:.1f}%",
                f"{f['log_ms']:.3f} / {f['log_cpu_ms']:.3f} / {f['service_ms_per_log']:.3f}",
                f"{f['finish_s']:.2f}",
            ]
        )
    headers = [
        "wandb settings",
        "import wandb: s / CPU s",
        "wandb.init: s / CPU s in the process / CPU s of the service",
        f"service CPU while idle ({idle_s:g} s)",
        "one run.log: ms / CPU ms in the process / CPU ms of the service",
        "run.finish s",
    ]
    return markdown_table(headers, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps, 1 round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of alternation")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=[*LOGGERS, *MITIGATIONS],
        default=list(LOGGERS),
        help="logger lists (and mitigations) to measure; logger=none is always measured",
    )
    parser.add_argument("--mitigations", action="store_true", help="add every mitigation")
    parser.add_argument("--breakdown", action="store_true", help="also wandb's time, alone")
    parser.add_argument("--idle-s", type=float, default=15.0, help="--breakdown's idle time")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS (default: torch's own)")
    parser.add_argument("--override", action="append", default=[], help="for every run")
    parser.add_argument("--wait-load", type=float, default=0, help="see benchmarks/README.md")
    parser.add_argument("--breakdown-child", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.breakdown_child:
        print(json.dumps(breakdown_child(args.breakdown_child, args.idle_s, log_calls=200)))
        return
    env = {**os.environ, **QUIET, "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    overrides = args.override
    if args.quick:
        args.repeats, args.idle_s = 1, 0.5
        overrides = [*overrides, "max_steps=5", "test_after_fit=false", "val_every_epochs=0"]
    if args.wait_load:
        wait_for_quiet(args.wait_load)
    names = [*args.configs, *(MITIGATIONS if args.mitigations else [])]
    configs = {
        label: ([*config, *overrides], extra_env)
        for label, (config, extra_env) in configurations(names).items()
    }
    threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else "torch's default threads"
    print(f"Machine: {machine()}; {threads}; extra overrides: {' '.join(overrides) or 'none'}.\n")
    print(f"{args.repeats} rounds, the configurations alternating run by run:\n")
    table = []
    for job in args.jobs:
        table += rows(job, alternate(JOBS[job], configs, args.repeats, env))
    print(markdown_table(HEADERS, table))
    if args.breakdown:
        settings = {"as in trainer/loggers/wandb.py": {}}
        if not args.quick:  # the smoke run: wandb as it is
            settings |= {sets: env for sets, extra, env in MITIGATIONS.values() if not extra}
        print("\nwandb alone, one fresh process per setting:\n")
        print(breakdown(settings, env, args.idle_s))
    print(f"\nLoad average at the end: {load_average()} (1, 5, 15 min)")


if __name__ == "__main__":
    main()
