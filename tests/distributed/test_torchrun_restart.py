"""`torchrun --max-restarts` with torch's shared rendezvous store on (its default): the restarted
group must not read the dead group's addresses.

torch >= 2.5 hands workers the agent's TCPStore, which outlives them, with no per-attempt prefix:
a restarted rank that connects before its peer has written its new address reads the old one
and gloo fails with "connectFullMesh failed ... Connection refused" (pytorch/pytorch#135712).
Here the restarted rank 1 is made late on purpose, so the old code fails every time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cli_env

from trainer.config import ConfigError
from trainer.distributed.env import init_distributed

# A worker through hooktrain's own process-group setup (trainer.distributed.env): in the first
# attempt both ranks connect and reduce, then rank 1 dies; in the restart rank 1 comes late.
WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from trainer.distributed.env import distributed

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 1:
    time.sleep(2)
with distributed("cpu", "gloo", 60):
    total = torch.ones(1)
    dist.all_reduce(total)
    if attempt == 0:
        if rank == 1:
            sys.exit(1)
        time.sleep(120)  # stopped by the agent when rank 1 fails
    with open(sys.argv[1], "a") as out:
        out.write(f"attempt {attempt} rank {rank} sum {total.item():.0f}\\n")
"""


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_restarted_group_connects_with_the_shared_store_on(tmp_path):
    script, result = tmp_path / "worker.py", tmp_path / "result.txt"
    script.write_text(textwrap.dedent(WORKER))
    env = cli_env()
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # torch's default: the shared store
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", "--monitor-interval=0.2", str(script), str(result)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "connectFullMesh" not in proc.stderr
    lines = sorted(Path(result).read_text().splitlines())
    assert lines == ["attempt 1 rank 0 sum 2", "attempt 1 rank 1 sum 2"]


def test_restarts_on_several_nodes_with_the_shared_store_are_refused(monkeypatch):
    """Across nodes the restart count differs between agents, so no prefix is safe: one line
    giving the fix, before any process group."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node"):
        init_distributed("cpu", "gloo", 5)
