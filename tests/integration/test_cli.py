"""End-to-end runs of the real `hooktrain` command (`python -m trainer`) in subprocesses.

Each subprocess costs seconds of imports, so one run serves several tests through module-scoped
fixtures: one tiny training run, one 2x2 sweep, three config errors and `--help`.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, run_cli
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.cli import composition_message, recipes_dir
from trainer.throughput import human_flops

pytestmark = pytest.mark.slow

MAX_STEPS = 5
LOG_EVERY = 2
TINY = [
    f"max_steps={MAX_STEPS}",
    "data=synthetic",
    "data.dataset.num_samples=512",
]


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    cwd: Path
    out: Path  # hydra.run.dir, or hydra.sweep.dir for a sweep
    seconds: float  # wall time of the whole subprocess


def launch(
    tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str], wandb_key: str = ""
) -> Run:
    """Run the command in a new folder; `wandb_key`: its WANDB_API_KEY (none by default, so that
    a developer's own key does not turn wandb on)."""
    cwd = tmp_path_factory.mktemp(name)
    out = cwd / "out"
    key = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    started = time.perf_counter()
    env = {"WANDB_API_KEY": wandb_key} if wandb_key else None  # cli_env() drops a developer's
    proc = run_cli([*args, f"{key}={out}"], cwd=cwd, timeout=240, env=env)
    return Run(proc, cwd, out, time.perf_counter() - started)


def ok(run: Run) -> Run:
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]
    return run


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- one tiny run

# The default loggers (tensorboard, jsonl) stay on. Checkpoints every 2 steps keep the last 2 and
# the lowest training loss.
TINY_RUN = [
    *TINY,
    f"log_every_steps={LOG_EVERY}",
    "checkpoint.every_steps=2",
    "checkpoint.best_monitor=train/loss",
    "checkpoint.best_mode=min",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Run:
    return ok(launch(tmp_path_factory, "tiny", TINY_RUN))


def test_run_writes_everything_into_the_run_dir(tiny_run):
    out = tiny_run.out
    for name in ("summary.json", "config.yaml", "metrics.jsonl", ".hydra/config.yaml"):
        assert (out / name).is_file(), name
    assert not (tiny_run.cwd / "outputs").exists()  # hydra.run.dir was honoured


def test_summary(tiny_run):
    summary = json.loads((tiny_run.out / "summary.json").read_text())
    keys = ("test/accuracy", "test/loss", "train/loss", "train_step_samples_per_second")
    for key in (*keys, "wall_seconds"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert 0.0 <= summary["test/accuracy"] <= 1.0
    assert summary["test/loss"] > 0 and summary["train/loss"] > 0
    assert summary["train_step_samples_per_second"] > 0
    # A classifier: one target per sample, so no tokens/s; FLOPs readable in the printed table.
    assert not any("tokens" in key for key in summary)
    flops = summary["train_flops_per_sample"]
    assert f"train_flops_per_sample │ {human_flops(flops)}" in " ".join(
        tiny_run.proc.stderr.split()
    )
    assert "train_step_*_per_second: samples (tokens) trained per second" in tiny_run.proc.stderr
    assert 0 < summary["wall_seconds"] < tiny_run.seconds
    assert summary["world_size"] == 1
    assert summary["steps"] == MAX_STEPS
    assert Path(summary["run_dir"]) == tiny_run.out
    # The best checkpoint is kept and named; its manifest holds the loss it was chosen by.
    best = Path(summary["best_checkpoint"])
    kept = sorted(p.name for p in (tiny_run.out / "checkpoints").iterdir())
    assert best.name in kept and {"step_00000004", "step_00000005"} <= set(kept)
    losses = {
        row["step"]: row["train/loss"]
        for row in read_jsonl(tiny_run.out / "metrics.jsonl")
        if "train/loss" in row
    }
    monitor = json.loads((best / "manifest.json").read_text())["monitor"]
    assert monitor == {"train/loss": min(losses[s] for s in (2, 4, 5))}  # the saved steps
    # The parameter count is the one of the model that config.yaml describes.
    model_cfg = OmegaConf.to_container(OmegaConf.load(tiny_run.out / "config.yaml").model)
    model = instantiate(model_cfg, input_shape=[64], num_classes=10)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters()) > 0


def printed_config(console: str) -> str:
    """The YAML that the run printed as its config: the lines after the log line that says so, up
    to the next log line."""
    _, _, rest = console.partition("][hooktrain][INFO] - config (also in ")
    lines = rest.splitlines()[1:]
    end = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    return "".join(line + "\n" for line in lines[:end])


def test_config_yaml_is_the_resolved_job_config(tiny_run):
    text = (tiny_run.out / "config.yaml").read_text()
    assert "${" not in text
    # printed once as the run starts, on the console and in the log, as config.yaml holds it
    assert tiny_run.proc.stdout.count("[INFO] - config (also in") == 1
    assert printed_config(tiny_run.proc.stdout) == text
    assert printed_config((tiny_run.out / "hooktrain_rank0.log").read_text()) == text
    cfg = OmegaConf.load(tiny_run.out / "config.yaml")
    assert cfg.max_steps == MAX_STEPS
    assert cfg.log_every_steps == LOG_EVERY
    assert cfg.data.dataset._target_ == "trainer.data.datasets.synthetic"
    assert cfg.data.dataset.num_samples == 512
    assert "hydra" not in cfg


def test_metrics_jsonl(tiny_run):
    rows = read_jsonl(tiny_run.out / "metrics.jsonl")
    summary = json.loads((tiny_run.out / "summary.json").read_text())
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    # every LOG_EVERY steps, and at the last step
    assert [step for step, _ in train] == [2, 4, 5]
    assert train[-1][1] == pytest.approx(summary["train/loss"])
    (test_row,) = [r for r in rows if "test/accuracy" in r]
    assert test_row["step"] == MAX_STEPS
    assert test_row["test/accuracy"] == pytest.approx(summary["test/accuracy"])
    assert test_row["test/loss"] == pytest.approx(summary["test/loss"])


def test_tensorboard_events(tiny_run):
    logdir = tiny_run.out / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logdir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "test/accuracy", "test/loss"} <= scalars
    jsonl = {
        r["step"]: r["train/loss"]
        for r in read_jsonl(tiny_run.out / "metrics.jsonl")
        if "train/loss" in r
    }
    train = events.Scalars("train/loss")
    assert [e.step for e in train] == sorted(jsonl)
    assert [e.value for e in train] == pytest.approx([jsonl[e.step] for e in train], rel=1e-5)
    summary = json.loads((tiny_run.out / "summary.json").read_text())
    (accuracy,) = events.Scalars("test/accuracy")
    assert accuracy.step == MAX_STEPS
    assert accuracy.value == pytest.approx(summary["test/accuracy"], rel=1e-5)


def test_metrics_jsonl_has_the_gradient_norm_of_every_log_step(tiny_run):
    rows = [r for r in read_jsonl(tiny_run.out / "metrics.jsonl") if "train/loss" in r]
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in rows)
    assert not any("perplexity" in key for r in rows for key in r)  # a classifier


def test_wandb_is_opt_in(tiny_run):
    assert not (tiny_run.out / "wandb").exists()
    assert "wandb:" not in (tiny_run.out / "config.yaml").read_text()


@pytest.fixture(scope="module")
def run_with_wandb_key(tmp_path_factory) -> Run:
    """WANDB_API_KEY set (a fake one; WANDB_MODE=offline from the test environment): wandb is on."""
    return ok(launch(tmp_path_factory, "wandb_key", [*TINY], wandb_key="fake-key-never-sent"))


def test_a_wandb_key_turns_wandb_on_offline_and_says_so(run_with_wandb_key):
    out = run_with_wandb_key.out
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert list(runs[0].glob("run-*.wandb"))
    assert "+logger=wandb" in OmegaConf.load(out / ".hydra/overrides.yaml")
    config = OmegaConf.load(out / "config.yaml")
    assert list(config.logger) == ["tensorboard", "jsonl", "wandb"]
    assert config.logger.wandb.mode == "offline"
    assert printed_config(run_with_wandb_key.proc.stdout) == (out / "config.yaml").read_text()
    assert "wandb logs this run: WANDB_API_KEY is set" in run_with_wandb_key.proc.stdout


# --------------------------------------------------------------------------- a sweep

LRS = {"1e-3": 1e-3, "3e-3": 3e-3}
MODELS = {"mlp": "trainer.models.MLP", "cnn": "trainer.models.CNN"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Run:
    args = ["-m", f"optim.lr={','.join(LRS)}", f"model={','.join(MODELS)}"]
    args += ["max_steps=3", *TINY[1:]]
    return ok(launch(tmp_path_factory, "sweep", args))


def job_dirs(sweep: Run) -> list[Path]:
    return sorted(p for p in sweep.out.iterdir() if p.is_dir())


def test_sweep_makes_one_folder_per_job(sweep):
    jobs = job_dirs(sweep)
    assert len(jobs) == len(LRS) * len(MODELS)
    seen = set()
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["steps"] == 3
        assert Path(summary["run_dir"]) == job
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(job / ".hydra/overrides.yaml"))
        cfg = OmegaConf.load(job / "config.yaml")
        assert cfg.optim.lr == pytest.approx(float(overrides["optim.lr"]))
        assert cfg.model._target_ == MODELS[overrides["model"]]
        assert f"optim.lr={cfg.optim.lr}" in job.name  # the folder is named after its job
        seen.add((cfg.optim.lr, overrides["model"]))
    assert seen == {(lr, model) for lr in LRS.values() for model in MODELS}
    assert not (sweep.cwd / "multirun").exists()  # hydra.sweep.dir was honoured


def test_sweep_jobs_time_themselves(sweep):
    # Jobs run one after another in one process, so each job's own wall time is a disjoint slice
    # of the process's lifetime: together they cannot exceed it.
    walls = [json.loads((j / "summary.json").read_text())["wall_seconds"] for j in job_dirs(sweep)]
    assert sum(walls) <= sweep.seconds, (walls, sweep.seconds)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=0"], "data.batch_size: must be >= 1, got 0"),
        (["optim.lr=-1"], "optim.lr: "),
        # A job that hooktrain launches itself is checked for its own world of 4 processes (where
        # fsdp_tp's tp_degree 2 fits), so the error reported is the model key, found before any
        # process starts.
        (
            ["parallel=fsdp_tp", "parallel.nproc_per_node=4", "+model.hiden=3"],
            "model.hiden: unknown key",
        ),
    ],
    ids=["batch_size", "lr", "launched_world"],
)
def test_config_error_is_one_line_and_exit_code_2(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"hooktrain: config error: {message}"), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    # Rejected before training: nothing was built, logged or saved.
    for name in ("summary.json", "config.yaml", "metrics.jsonl", "tensorboard", "checkpoints"):
        assert not (run_dir / name).exists(), name


def test_a_typo_without_plus_is_one_line_naming_the_section_keys(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "data.batchsize=64", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "hooktrain: config error: data.batchsize: unknown key (data takes: dataset, batch_size, "
        "eval_batch_size, num_workers, shuffle, drop_last, batched_fetch)"
    ]  # not Hydra's hint, `+data.batchsize=64`, which would only add the typo
    assert not run_dir.exists()  # refused while composing: no run folder at all


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "optim.lrr: unknown key for torch.optim.AdamW (optim takes: lr, "),
        ("seeed=1", "seeed: unknown key (the config takes: data, model, optim, "),
        ("optim=adam", "In 'train': Could not find 'optim/adam' (options: adamw, sgd)"),
        ("model.hidden=[3", "model.hidden=[3: no viable alternative at input '[3'"),
    ],
)
def test_what_hydra_cannot_compose_is_said_in_one_line(override, message):
    """The same translation of Hydra's errors, in this process: a `_target_` section's keys, the
    top level's, a group option that does not exist, an override that does not parse."""
    refused = pytest.raises((ConfigCompositionException, OverrideParseException))
    with initialize_config_dir(str(recipes_dir()), version_base="1.3"), refused as composing:
        compose("train", overrides=[override])
    said = composition_message(composing.value)
    assert said.startswith(message) and "\n" not in said, said


# --------------------------------------------------------------------------- --help


def test_help_lists_every_group_and_option(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = proc.stdout
    assert "== Configuration groups ==" in text
    section = text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    listed = {}
    for line in section.splitlines():
        group, sep, options = line.partition(": ")
        if sep and " " not in group:
            listed[group] = {o.strip() for o in options.split(",")}
    recipes = recipes_dir()
    # Hydra's own groups (recipes/hydra/launcher) are listed by --hydra-help, not --help.
    on_disk = {
        d.name: {p.stem for p in d.glob("*.yaml")}
        for d in recipes.iterdir()
        if d.is_dir() and d.name != "hydra"
    }
    for group in ("model", "data", "optim", "schedule", "parallel", "callbacks", "logger"):
        assert group in listed, group
    assert "experiment" in listed
    assert listed == on_disk
    # and the composed default config follows
    assert "_target_: trainer.models.CNN" in text
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- one run folder, one run

HOLD = """
import sys, time
from pathlib import Path
from trainer.run_folder import hold

with hold(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _one_line(returncode: int, stderr: str, code: int) -> str:
    assert returncode == code, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_finished_runs_folder_is_held_and_kept(tiny_run, tmp_path):
    """A live job holds its folder: a second job is refused, naming the holder; the lock of a
    killed holder is taken over. Neither a resume of the finished run nor one that fails (here
    a damaged checkpoint under `parallel.nproc_per_node=2`, whose error is one line from the
    launching process, exit code 3) changes what the run wrote."""
    held, damaged = tmp_path / "held", tmp_path / "damaged"
    for copy in (held, damaged):
        shutil.copytree(tiny_run.out, copy)
    kept = ("config.yaml", "summary.json", ".hydra/overrides.yaml", ".hydra/config.yaml")
    written = {name: (held / name).read_bytes() for name in kept}
    metrics = (held / "metrics.jsonl").read_bytes()
    damaged_file = damaged / "checkpoints" / "step_00000004" / "trainer_state.pt"
    with open(damaged_file, "ab") as file:
        file.write(b"\0")  # its checksum no longer matches the manifest's
    # The launched job runs on its own copy meanwhile: three processes, the slowest part.
    launched = subprocess.Popen(
        [sys.executable, "-m", "trainer", *TINY_RUN, "parallel=ddp", "parallel.nproc_per_node=2",
         f"resume={damaged_file.parent}", f"hydra.run.dir={damaged}"],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(held)], env=cli_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        refused = run_cli([*TINY_RUN, "resume=auto", f"hydra.run.dir={held}"], cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    line = _one_line(refused.returncode, refused.stderr, 2)
    assert line.startswith(f"hooktrain: config error: hydra.run.dir: {held} is in use by another")
    assert f"(host {socket.gethostname()} pid {holder.pid})" in line

    # The holder died without releasing its lock: the next job takes it over. No step is left
    # to train, so the finished run's files stay as they were.
    resumed = run_cli([*TINY_RUN, "resume=auto", f"hydra.run.dir={held}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    taken = f"taking over the lock of host {socket.gethostname()} pid {holder.pid}"
    assert taken in (held / "hooktrain_rank0.log").read_text()  # and on the console
    assert "had already trained to step 5; nothing to do" in resumed.stderr
    assert {name: (held / name).read_bytes() for name in written} == written
    assert (held / "metrics.jsonl").read_bytes().startswith(metrics)  # appended to at most
    assert (held / "hooktrain.lock").read_text() == ""  # released

    line = _one_line(launched.wait(timeout=240), launched.stderr.read(), 3)
    assert line == (
        f"hooktrain: checkpoint error: {damaged_file}: checksum mismatch (truncated or corrupted)"
    )
    assert {name: (damaged / name).read_bytes() for name in written} == written
    assert damaged_file.exists()  # left for inspection
