"""A user's own model and data: what turns `model._target_=mymodels.TinyNet` into that class's
node alone, and what lets the user's modules be named at all.

- `replace_overridden_nodes`: an override of `model._target_` (or `data.dataset._target_`) picks
  the group's empty option (`recipes/model/custom.yaml`, `recipes/data/custom.yaml`) unless the
  command picks an option itself, so the default's keys (the CNN's `channels`, ...) are not left
  behind for a class that does not take them; that node's other keys (`model.width=64`) are then
  added (`++`) rather than overridden. Hydra's own group mechanism does the replacing, so
  `--cfg job`, sweeps and `.hydra/overrides.yaml` all show what ran; a typo in a key stays a typo,
  refused by the target's own signature (trainer/targets.py).
- `with_default_targets`: `allowed_targets` names prefixes added to the defaults, never in their
  place, so `allowed_targets=[mymodels.]` does not have to repeat them.
- `importable_cwd`: the folder a user runs `hooktrain` from is where their modules are (as it is
  for `python -m trainer`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from trainer.config import TrainConfig

# node whose `_target_` a user may point at their own code -> the config group that fills it
REPLACEABLE = {"model": "model", "data.dataset": "data"}
_OVERRIDE = re.compile(r"(?P<add>\+{0,2})(?P<key>[\w.\-/@]+)=(?P<value>.*)", re.DOTALL)


def replace_overridden_nodes(overrides: Sequence[str]) -> list[str]:
    """`overrides` (Hydra's `key=value` strings) with each node whose `_target_` they set taken
    from the group's `custom` option: the default's keys go, the user's stay."""
    parsed = [_OVERRIDE.fullmatch(o) for o in overrides]
    keys = {m["key"] for m in parsed if m}
    result = list(overrides)
    for node, group in REPLACEABLE.items():
        if f"{node}._target_" not in keys or group in keys:
            continue  # no new target, or the command chose the group's option itself
        result = [
            f"++{m['key']}={m['value']}"
            if m and not m["add"] and m["key"].startswith(f"{node}.")
            else override
            for override, m in zip(result, parsed, strict=True)
        ]
        result.insert(0, f"{group}=custom")
        parsed.insert(0, None)
    return result


def overridden_keys(overrides: Sequence[str]) -> list[str]:
    """The keys (or group names) `overrides` set."""
    return [m["key"] for m in map(_OVERRIDE.fullmatch, overrides) if m]


def default_targets() -> list[str]:
    return next(
        f for f in dataclasses.fields(TrainConfig) if f.name == "allowed_targets"
    ).default_factory()


def with_default_targets(cfg: DictConfig) -> None:
    """Put the default `allowed_targets` prefixes first in `cfg`'s list (in place)."""
    own = [prefix for prefix in cfg.allowed_targets if prefix not in default_targets()]
    cfg.allowed_targets = [*default_targets(), *own]


def importable_cwd() -> None:
    """Make the working folder's modules importable (after the installed ones, which a file of
    the same name in the folder must not shadow)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
