"""launch/local.sh and launch/torchrun.sh, run for real by bash without an activated virtual
environment: they must use the checkout's .venv, not whatever `python` and `torchrun` are on PATH.

Each script runs from a copy of launch/ in a scratch checkout whose `.venv/bin/python` is this
interpreter; `python`, `python3` and `torchrun` on PATH are stubs that fail, as a bare system
Python without hooktrain's packages would (`No module named 'hydra'`, `torchrun: not found`).
Both jobs are refused by a config error, which also shows where each puts its run folder, how
often the error is printed, and under torchrun one log per rank in one shared folder.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, cli_env

pytestmark = pytest.mark.slow

TINY = ["data=synthetic", "data.dataset.num_samples=512", "logger=[jsonl]", "callbacks=none"]


def _executable(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_scripts_use_the_checkouts_venv_and_report_a_config_error_once(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "launch", checkout / "launch")
    _executable(checkout / ".venv" / "bin" / "python", f'exec {sys.executable} "$@"')
    stubs = tmp_path / "stubs"
    for name in ("python", "python3", "torchrun"):
        _executable(stubs / name, f'echo "stub {name} was run" >&2; exit 97')
    env = {**cli_env(), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    env.update(NPROC="2", SHOW_RANKS="0,1")  # torchrun.sh: both ranks' console output
    for name in ("VIRTUAL_ENV", "PYTHON"):
        env.pop(name, None)

    def start(script: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", str(checkout / "launch" / script), *TINY, *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    # A batch larger than the training split: found only while building the trainer.
    local = start("local.sh", "data.batch_size=100000")
    torchrun = start("torchrun.sh", "data.batch_size=0")
    local_err, torchrun_err = (
        local.communicate(timeout=240)[1],
        torchrun.communicate(timeout=240)[1],
    )
    assert "stub" not in local_err + torchrun_err

    assert local.returncode == 2, local_err[-3000:]
    lines = [line for line in local_err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hooktrain: config error: "), local_err
    assert "batch_size" in lines[0]
    # Each job's own folder, <date>/<time>-<id>: a random id for one process, the rendezvous
    # id under torchrun.
    folders = {len(d.name.rsplit("-", 1)[1]): d for d in (checkout / "outputs").glob("*/*")}
    # The refused one-process run took away the folder made for it (a 6-hex id); torchrun's
    # ranks agreed on one folder (an 8-hex id).
    # (rank 0 may have taken torchrun's away too, if rank 1 had not logged there yet)
    assert set(folders) <= {8}, folders
    torchrun_dir = folders.get(8, checkout / "none")

    assert torchrun.returncode != 0, torchrun_err[-3000:]
    said = [line for line in torchrun_err.splitlines() if line.startswith("hooktrain: ")]
    assert said == ["hooktrain: config error: data.batch_size: must be >= 1, got 0"]
    # torchrun's two ranks agreed on one folder (named by the agent's start time), each rank
    # logging to its own file there; rank 0 took its own away with what it wrote for the
    # refused job; rank 1's may be left.
    logs = {path.name for path in torchrun_dir.glob("*.log")}
    assert logs <= {"hooktrain_rank1.log"}, logs
    assert torchrun_dir.name == "none" or re.fullmatch(
        r"\d\d-\d\d-\d\d-[0-9a-f]{8}", torchrun_dir.name
    )
