"""What the Docker images do, minus Docker: lint the Dockerfiles, then run their install step
(`pip install .` of a built wheel) and start `hooktrain` from outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


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
