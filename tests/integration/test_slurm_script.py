"""launch/slurm.sbatch's preemption path, run for real by bash with SLURM's commands stubbed.

SLURM sends USR1 to the batch script before the time limit: the script must requeue the job and
pass SIGTERM to the job step (srun -> torchrun -> every rank saves and exits), then wait for the
step to finish its save before it exits itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_usr1_requeues_the_job_and_lets_the_job_step_save(tmp_path):
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(
        bin_dir, "scontrol", f'echo "scontrol $*" >> {log}\nif [ "$1" = show ]; then echo node1; fi'
    )
    # The job step: notes its arguments, and on SIGTERM takes a moment to "save", then exits 0.
    _stub(
        bin_dir,
        "srun",
        f'echo "srun $*" >> {log}\n'
        f"trap 'sleep 0.5; echo \"srun saved after TERM\" >> {log}; exit 0' TERM\n"
        "while true; do sleep 0.1; done",
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_GPUS_PER_NODE": "2",
    }
    script = subprocess.Popen(
        ["bash", str(REPO_ROOT / "launch" / "slurm.sbatch"), "parallel=ddp"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group: the script and its job step
    )
    try:
        deadline = time.monotonic() + 20
        while not (log.exists() and "srun " in log.read_text()):
            assert time.monotonic() < deadline and script.poll() is None, log.read_text()
            time.sleep(0.1)
        script.send_signal(signal.SIGUSR1)
        output = script.communicate(timeout=20)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)  # nothing is left behind, whatever happened

    assert script.returncode == 0, output
    calls = log.read_text().splitlines()
    (launch,) = [c for c in calls if c.startswith("srun --")]
    assert (
        "-m torch.distributed.run" in launch
        and "--max-restarts=3" in launch
        and "resume=auto" in launch
    )
    assert "--rdzv_endpoint=node1:29500" in launch and launch.endswith("parallel=ddp")
    assert "scontrol requeue 4242" in calls
    # The script waited for the job step's save instead of exiting at the signal.
    assert calls[-1] == "srun saved after TERM"
