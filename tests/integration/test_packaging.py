"""What the Docker images do, minus Docker: lint the Dockerfiles, check that they install the torch
CI tests and keep run folders where a mount can reach them, then run their install step
(`pip install .` of a built wheel) and start `hooktrain` from outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
# The torch CI runs: the one in this environment, which launch/install.sh installs by default.
TESTED_TORCH = Version(torch.__version__.split("+")[0])


def test_both_images_exist_and_lint_clean():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_exists(dockerfile):
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", dockerfile.read_text(), flags=re.M)
    sources = [src for line in copies for src in line.split()]
    assert {"pyproject.toml", "trainer", "recipes"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile.name} copies missing {src}"


def test_torch_versions_named_anywhere_are_the_one_ci_tests():
    """The images' pins, the installer's default and pyproject's lower bound are one release."""
    install_sh = (REPO / "launch" / "install.sh").read_text()
    default = re.search(r"HOOKTRAIN_TORCH_VERSION:-([\w.]+)\}", install_sh)
    assert default and Version(default.group(1)) == TESTED_TORCH, "launch/install.sh"
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        # A pip pin (torch==X) or a base image named by its torch (pytorch/pytorch:X-...).
        pins = re.findall(r"\btorch==([\w.]+)|pytorch/pytorch:([\d.]+)", text)
        assert pins, f"{dockerfile.name} does not pin torch"
        assert {Version(a or b) for a, b in pins} == {TESTED_TORCH}, dockerfile.name
    # The dependency string (tomllib is 3.11+, the project supports 3.10).
    (line,) = re.findall(
        r'^\s*"(torch(?![\w-])[^"]*)"', (REPO / "pyproject.toml").read_text(), re.M
    )
    spec = Requirement(line).specifier
    (lower,) = [Version(s.version) for s in spec if s.operator == ">="]
    # Nothing older than the tested release is allowed (its patch releases are).
    assert lower == Version(f"{TESTED_TORCH.major}.{TESTED_TORCH.minor}"), "pyproject.toml"
    assert TESTED_TORCH in spec


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_run_folders_land_where_the_documented_mount_is(dockerfile):
    """Run folders go to outputs/ under the working directory (hydra.run.dir), so the image's
    working directory must be the folder whose outputs/ the header's `docker run -v` mounts, and
    writable by any --user (for what is not mounted)."""
    hydra = OmegaConf.load(REPO / "recipes" / "train.yaml").hydra
    run_dir = OmegaConf.to_container(hydra, resolve=False)["run"]["dir"]
    assert run_dir == "${run_folder:outputs}"  # outputs/<date>/<time>-<id>: trainer/run_folder.py
    text = dockerfile.read_text()
    assert re.findall(r"^WORKDIR\s+(\S+)$", text, flags=re.M)[-1] == "/app"
    assert '-v "$PWD/outputs:/app/outputs"' in text and '--user "$(id -u):$(id -g)"' in text
    assert "chmod 1777 /app" in text


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(tmp_path):
    """An installed package, not the checkout, must find its recipes (the images rely on it)."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "build", "*.egg-info"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)], check=True)  # fmt: skip
    wheel = next((tmp_path / "dist").glob("hooktrain-*.whl"))
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}
    probe = "import trainer, trainer.cli as c; print(trainer.__file__); print(c.recipes_dir())"
    where = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)  # fmt: skip
    package_file, recipes = where.stdout.split()
    assert Path(package_file).is_relative_to(site), "the checkout shadowed the installed package"
    assert Path(recipes) == site / "trainer" / "recipes"
    job = subprocess.run([sys.executable, "-m", "trainer", "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert job.returncode == 0, job.stderr
    assert "_target_: trainer.models.CNN" in job.stdout
