"""A run killed while saving, restarted, then stopped by Ctrl-C: what the real `hooktrain` command
prints without a terminal, and what its logs and checkpoints hold afterwards.

One run folder, two attempts of the same command line (`resume=auto`, as a scheduler's restart
would run it; TORCHELASTIC_RESTART_COUNT tells the fault callbacks which attempt they are in):

1. SIGKILL while the checkpoint of step 12 is being saved: steps 4 and 8 are committed, 12 is
   left `.partial`, and the logs already hold steps 1-12.
2. Resumes from step 8 and gets a real SIGINT (Ctrl-C) during step 28: it stops there with a
   checkpoint and exits 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.*

from tests.faults import read_jsonl  # noqa: E402

MAX_STEPS = 30  # 410 training samples / 16: 25 steps an epoch
KILL_STEP, SIGINT_STEP = 12, 28
COMMAND = [
    "data=synthetic",
    "data.dataset.num_samples=512",
    "data.batch_size=16",
    "model=mlp",
    "model.hidden=[32]",
    "logger=[jsonl,tensorboard,wandb]",
    "callbacks=[progress]",
    "callbacks.progress.plain_every_s=0",  # a plain line after every step
    f"max_steps={MAX_STEPS}",
    "log_every_steps=1",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=3",
    "resume=auto",
    "allowed_targets=[trainer.,torch.optim.,torch.nn.,tests.]",
    "+callbacks.kill._target_=tests.resume_faults.KillWhileSaving",
    f"+callbacks.kill.step={KILL_STEP}",
    "+callbacks.ctrl_c._target_=tests.faults.SendSignal",
    "+callbacks.ctrl_c.signal=SIGINT",
    f"+callbacks.ctrl_c.step={SIGINT_STEP}",
]


def steps_logged(rows: list[dict]) -> list[int]:
    return sorted(row["step"] for row in rows if "train/loss" in row)


@pytest.fixture(scope="module")
def attempts(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("interrupted")
    run_dir = cwd / "run"
    seen: dict = {"run_dir": run_dir}
    with pytest.MonkeyPatch.context() as env:
        for attempt in (0, 1):
            env.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
            proc = run_cli([*COMMAND, f"hydra.run.dir={run_dir}"], cwd=cwd, timeout=240)
            seen[attempt] = proc
            metrics = run_dir / "metrics.jsonl"
            seen[f"rows_{attempt}"] = read_jsonl(metrics) if metrics.exists() else []
            seen[f"wandb_{attempt}"] = sorted(
                p.name for p in (run_dir / "wandb").glob("offline-run-*")
            )
    return seen


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_the_logs_hold_what_a_checkpoint_covers_and_each_step_once_after_a_resume(attempts):
    run_dir = attempts["run_dir"]
    assert attempts[0].returncode == -9  # SIGKILL
    # Killed while saving step 12: the logs were flushed before that save began.
    assert steps_logged(attempts["rows_0"]) == list(range(1, KILL_STEP + 1))
    _ok(attempts[1])
    # The resumed attempt went on from step 8 and dropped the first attempt's rows 9-12.
    assert steps_logged(attempts["rows_1"]) == list(range(1, SIGINT_STEP + 1))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert sorted(e.step for e in events.Scalars("train/loss")) == list(range(1, SIGINT_STEP + 1))


def test_a_resume_says_where_it_resumed_from_and_keeps_one_wandb_run(attempts):
    run_dir = attempts["run_dir"]
    _ok(attempts[1])
    folder = run_dir / "checkpoints" / "step_00000008"
    lines = [line for line in attempts[1].stdout.splitlines() if "resumed from" in line]
    assert len(lines) == 1 and lines[0].endswith(f"resumed from {folder} (step 8, epoch 0)")
    assert "resumed from" not in attempts[0].stdout
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    (first,) = attempts["wandb_0"]
    second = [name for name in attempts["wandb_1"] if name != first]
    assert first.endswith(f"-{run_id}") and len(second) == 1 and second[0].endswith(f"-{run_id}")


def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint(attempts):
    run_dir = attempts["run_dir"]
    proc = attempts[1]
    _ok(proc)
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == SIGINT_STEP and "SIGINT" in summary["stop_reason"]
    assert not any(key.startswith("test/") for key in summary)  # stopped: no test pass
    manifest = json.loads(
        (run_dir / "checkpoints" / f"step_{SIGINT_STEP:08d}" / "manifest.json").read_text()
    )
    assert manifest["step"] == SIGINT_STEP
    assert "received SIGINT: stopping with a checkpoint" in proc.stdout


def test_without_a_terminal_progress_is_printed_as_plain_lines_while_training(attempts):
    stderr = attempts[1].stderr
    lines = [line for line in stderr.splitlines() if line.startswith("epoch ")]
    # plain_every_s=0: a line after every step of this attempt, one more at the epoch's end.
    shown = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    assert shown == [*range(9, 26), 25, *range(26, SIGINT_STEP + 1)]
    epoch_end = lines[25 - 9 + 1]
    assert epoch_end.startswith("epoch 0  step 25/30  loss ") and "val/loss " in epoch_end
    assert all("eta " in line and "samples/s" in line for line in lines)
    assert "━" not in stderr  # no bar drawn


def test_ctrl_c_outside_fit_is_one_line_and_exit_130(tmp_path):
    proc = run_cli(
        [
            "data.dataset._target_=tests.resume_faults.interrupted_while_building",
            "allowed_targets=[trainer.,torch.optim.,torch.nn.,tests.]",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1:]) == (
        130,
        ["hooktrain: interrupted"],
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
