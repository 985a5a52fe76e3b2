"""examples/own_model.py under torchrun, exactly as its docstring says to launch it, from a folder
outside the package that holds the examples: 2 ranks (gloo, CPU) share one run folder that rank 0 alone
writes, every rank's `fit` returns the same summary, and the run reads back with `hooktrain
evaluate` handed nothing but the folder's own files and the example's data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, cli_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(240)]

EXAMPLES = REPO_ROOT / "examples"
DOCUMENTED = "torchrun --standalone --nproc_per_node=2 examples/own_model.py parallel=ddp"
# what the example prints on every rank: its summary's numbers and run folder
PRINTED = re.compile(
    r"test accuracy (\S+), test loss (\S+), (\d+) steps on (\d+) process\(es\), "
    r"run folder (outputs/\S+?-[0-9a-f]{8})"
)


def test_the_example_under_torchrun_writes_one_run_from_rank_zero(tmp_path: Path, monkeypatch):
    assert DOCUMENTED in " ".join((EXAMPLES / "own_model.py").read_text().split())
    shutil.copytree(EXAMPLES, tmp_path / "examples")  # a checkout's examples/, nothing else
    done = subprocess.run(
        # the command as documented, from the folder that holds examples/
        [sys.executable, "-m", "torch.distributed.run", *DOCUMENTED.split()[1:]],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = PRINTED.findall(done.stdout)
    assert len(printed) == 2 and printed[0] == printed[1], done.stdout  # one line a rank
    accuracy, loss, steps, world_size, folder = printed[0]

    run_dirs = [p.parent for p in tmp_path.glob("outputs/*/*/config.yaml")]
    assert run_dirs == [tmp_path / folder]
    summary = json.loads((tmp_path / folder / "summary.json").read_text())
    assert (f"{summary['test/accuracy']:.3f}", f"{summary['test/loss']:.4f}") == (accuracy, loss)
    assert (summary["steps"], summary["world_size"]) == (int(steps), int(world_size)) == (24, 2)
    # nothing outside the run folder, and in it no file of rank 1's but its checkpoint shards
    written = {
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts  # Python's own, for mymodels
    }
    assert {p for p in written if not p.startswith(f"{folder}/checkpoints/")} == {
        *(f"examples/{p.name}" for p in EXAMPLES.glob("*.py")),
        *(f"{folder}/{name}" for name in (
            "config.yaml", "summary.json", "metrics.jsonl", "hooktrain.lock", "model.pt",
        )),
    }  # fmt: skip

    # The final weights: the user's class loads them and scores the summary's test accuracy.
    monkeypatch.syspath_prepend(str(tmp_path / "examples"))
    from mymodels import TinyNet
    from own_model import blobs

    saved = torch.load(tmp_path / folder / "model.pt", weights_only=True)
    model = TinyNet(input_shape=(8,), num_classes=2, width=16)
    model.load_state_dict(saved["state_dict"])
    x, y = blobs(128, 2).tensors  # the example's test split
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).double().mean().item() == summary["test/accuracy"]
