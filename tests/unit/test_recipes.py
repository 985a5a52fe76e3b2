"""The Hydra config tree `recipes/`: every option of every group composes and validates, every
experiment preset says how to launch it and takes effect, and the wheel ships the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from trainer.cli import recipes_dir  # importing it registers `train_schema` and `${run_folder:}`
from trainer.config import ConfigError, TrainConfig, validate
from trainer.distributed.parallelize import tensor_parallel_plan
from trainer.targets import build

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = recipes_dir()


def group_options() -> list[tuple[str, str]]:
    """(group, option) for every `<group>/<option>.yaml` under recipes/ (nested groups too)."""
    return sorted(
        (path.parent.relative_to(RECIPES).as_posix(), path.stem)
        for path in RECIPES.rglob("*.yaml")
        if path.parent != RECIPES
    )


OPTIONS = group_options()
EXPERIMENTS = [name for group, name in OPTIONS if group == "experiment"]


def compose_train(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return compose(
            config_name="train", overrides=overrides, return_hydra_config=return_hydra_config
        )


def test_the_walk_finds_every_option_file():
    all_yaml = list(RECIPES.rglob("*.yaml"))
    assert (RECIPES / "train.yaml").is_file()
    assert len(OPTIONS) == len(all_yaml) - 1  # everything but the primary train.yaml
    # Counted by hand from the tree: a new option file must be added here too, on purpose.
    per_group = {"callbacks": 10, "data": 5, "experiment": 16, "hydra/launcher": 1, "logger": 4}
    per_group |= {"hydra/sweeper": 1, "loss": 2, "model": 6, "optim": 2, "parallel": 5}
    per_group |= {"schedule": 14}
    found = {group: sum(1 for g, _ in OPTIONS if g == group) for group, _ in OPTIONS}
    assert found == per_group
    assert len(OPTIONS) == sum(per_group.values()) == 66


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group, option, monkeypatch):
    # validate() checks the parallel layout against the launcher's WORLD_SIZE: the scale-out
    # strategies are checked in a world of 4 (tp_degree 2 of fsdp_tp divides it), the rest
    # (parallel=none included: it is one process) in 1.
    if group == "parallel" and option != "none":
        monkeypatch.setenv("WORLD_SIZE", "4")
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    # The `custom` options are empty nodes for a user's own `_target_`: give them one.
    filled = {"model": "++model._target_=trainer.models.MLP"}
    filled["data"] = "++data.dataset._target_=trainer.data.datasets.digits"
    extra = [filled[group]] if option == "custom" else []
    cfg = compose_train([f"{group}={option}", *extra])
    typed = validate(cfg)
    assert isinstance(typed, TrainConfig)
    if extra:
        return  # the file's `???` was filled above: nothing of it to compare
    # The option really is the one selected (presets are global, so they land at the top level;
    # Hydra's own groups, like hydra/launcher, land under the `hydra` node).
    if group != "experiment":
        if group.startswith("hydra/"):
            cfg = compose_train([f"{group}={option}"], return_hydra_config=True)
        selected = OmegaConf.select(cfg, group.replace("/", "."))
        loaded = OmegaConf.load(RECIPES / group / f"{option}.yaml")
        for key, value in loaded.items():
            if key != "defaults":
                assert selected[key] == value, f"{group}={option}: {key}"


def header_comment(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_header_says_how_to_launch_it(name):
    header = header_comment(RECIPES / "experiment" / f"{name}.yaml")
    assert header and header[0].strip() == "# @package _global_"
    launch = [line for line in header if "Launch:" in line]
    assert launch, f"experiment/{name}.yaml has no `Launch:` line in its header comment"
    assert f"experiment={name}" in launch[0]  # the command launches this very preset


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_values_take_effect(name):
    cfg = compose_train([f"experiment={name}"])
    assert "experiment" not in cfg  # merged at the top level, not nested under `experiment`
    preset = OmegaConf.load(RECIPES / "experiment" / f"{name}.yaml")
    values = {k: v for k, v in preset.items() if k != "defaults"}
    assert values, f"experiment/{name}.yaml sets no values"
    set_here = _leaves(OmegaConf.to_container(preset, resolve=True))
    set_here.pop("defaults", None)
    for key, value in set_here.items():  # a preset may set single keys inside a node
        assert OmegaConf.select(cfg, key) == value, f"experiment={name}: {key}"
    for entry in preset.get("defaults", []):
        for target, option in entry.items():  # e.g. {"override /model": "gpt"}
            group = target.split("/", 1)[1]
            selected = OmegaConf.select(cfg, group.replace("/", "."))
            for one in option if OmegaConf.is_list(option) else [option]:  # a list group
                for key, value in OmegaConf.load(RECIPES / group / f"{one}.yaml").items():
                    where = f"{group.replace('/', '.')}.{key}"
                    if not any(k == where or k.startswith(f"{where}.") for k in set_here):
                        assert selected[key] == value, f"experiment={name}: {group}.{key}"


def _leaves(node: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every non-mapping value in `node`."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value and key != "defaults":
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_wheel_ships_the_recipes(tmp_path):
    # Build from a copy of the sources so that the checkout gets no build/ or *.egg-info litter.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*_cache", "outputs"
    )
    shutil.copytree(REPO_ROOT, src, ignore=ignore, symlinks=True)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("hooktrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "trainer/cli.py" in names
    assert "trainer/compress/lowrank.py" in names and "trainer/compress/quantize.py" in names
    assert "trainer/recipes/train.yaml" in names
    assert "trainer/recipes/model/cnn.yaml" in names
    shipped = {n for n in names if n.startswith("trainer/recipes/") and n.endswith(".yaml")}
    assert len(shipped) == len(OPTIONS) + 1


def test_the_tp_preset_names_exactly_the_models_with_a_tensor_parallel_plan():
    (line,) = [
        line for line in header_comment(RECIPES / "parallel" / "tp.yaml") if "Models:" in line
    ]
    listed = {name.strip() for name in line.split("Models:")[1].split("(")[0].split(",")}
    with_plan = set()
    for _, option in (o for o in OPTIONS if o[0] == "model" and o[1] != "custom"):
        node = OmegaConf.to_container(OmegaConf.load(RECIPES / "model" / f"{option}.yaml"))
        shape = (16,) if option == "gpt" else (1, 8, 8)  # token ids, or a digit image
        model = build(node, "model", ["trainer."], input_shape=shape, num_classes=10)
        try:
            plan = tensor_parallel_plan(model)
        except ConfigError:
            continue
        modules = dict(model.named_modules())
        assert all(name in modules for name in plan), f"{option}: {plan}"  # it names real layers
        with_plan.add(option)
    assert listed == with_plan
