"""A user's own model and data from the command line, as the README shows it: run from the
user's project folder (a tmp folder holding examples/mymodels.py), through the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT, cli_env, run_cli
from omegaconf import OmegaConf

from trainer.api import fit
from trainer.own_code import default_targets

pytestmark = pytest.mark.slow

EXAMPLES = REPO_ROOT / "examples"
# The README's command, and a short budget on top.
README_COMMAND = [
    "model._target_=mymodels.TinyNet",
    "model.width=64",
    "allowed_targets=[mymodels.]",
]
SHORT = ["max_epochs=1", "logger=[jsonl]", "callbacks=[]"]
SAME_NUMBERS = ("train/loss", "val/loss", "val/accuracy", "test/loss", "test/accuracy", "steps")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project folder with their model module, importable in this process too."""
    shutil.copy(EXAMPLES / "mymodels.py", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_readme_own_model_command_replaces_the_node_and_matches_the_python_api(project: Path):
    cli = run_cli([*README_COMMAND, *SHORT, "hydra.run.dir=cli"], cwd=project)
    assert cli.returncode == 0, cli.stderr[-3000:]
    config = OmegaConf.load(project / "cli" / "config.yaml")
    # the default CNN's keys are gone; the user's are kept; the allowlist keeps its defaults
    assert OmegaConf.to_container(config.model) == {"_target_": "mymodels.TinyNet", "width": 64}
    assert list(config.allowed_targets) == [*default_targets(), "mymodels."]
    from_cli = json.loads((project / "cli" / "summary.json").read_text())

    from_python = fit(overrides=[*README_COMMAND, *SHORT], run_dir=project / "api")
    assert {k: from_python[k] for k in SAME_NUMBERS} == {k: from_cli[k] for k in SAME_NUMBERS}
    assert OmegaConf.load(project / "api" / "config.yaml") == config


def test_readme_python_example_runs_from_a_project_folder(tmp_path: Path):
    for name in ("mymodels.py", "own_model.py"):
        shutil.copy(EXAMPLES / name, tmp_path)
    done = subprocess.run(
        [sys.executable, "own_model.py"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = Path(tmp_path, done.stdout.strip().rpartition("run folder ")[2])
    summary = json.loads((folder / "summary.json").read_text())
    assert f"test accuracy {summary['test/accuracy']:.3f}" in done.stdout
    model = OmegaConf.load(folder / "config.yaml").model
    assert OmegaConf.to_container(model) == {
        "_target_": "trainer.api.given",
        "type": "mymodels.TinyNet",
    }


def test_a_dataset_of_other_items_is_one_line_and_exit_2_with_nothing_written(project: Path):
    (project / "mydata.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Unlabelled:
                def __len__(self):
                    return 64

                def __getitem__(self, i):
                    return torch.full((4,), float(i))

            def splits():
                return Unlabelled(), Unlabelled(), Unlabelled()
            """
        )
    )
    bad = run_cli(
        ["data.dataset._target_=mydata.splits", "allowed_targets=[mydata.]", "model=mlp"],
        cwd=project,
    )
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip() == (
        "hooktrain: config error: data.dataset: the train split's items must be (input, target) "
        "pairs of tensors or numbers; item 0 is a Tensor"
    )
    assert not any(path.is_file() for path in project.rglob("outputs/**/*"))
