"""No code execution from data: the package never unpickles except through an allowlist, never
`eval`s or `exec`s, and its checkpoint files load with `torch.load(weights_only=True)`.

The scan parses every module under trainer/ (comments and docstrings do not count, `model.eval()`
is not `eval(`) and refuses:

- `pickle.load` / `pickle.loads` / `pickle.Unpickler(...)` (also `cPickle`, `dill`,
  `cloudpickle`, and names imported from those modules),
- a subclass of `pickle.Unpickler` that does not override `find_class` (the allowlist; the one
  there is, for DCP's `.metadata`, is trainer/checkpoint_reader.py's),
- `torch.load(...)` without a literal `weights_only=True`,
- `numpy.load(..., allow_pickle=True)`,
- the builtins `eval(...)` and `exec(...)`.

What the allowlist refuses, in crafted checkpoints, is tested in test_checkpoint_integrity.py.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # the checkout, for tests.helpers

from tests.helpers import ADAMW, make_trainer  # noqa: E402
from trainer.callbacks.base import Callback  # noqa: E402
from trainer.checkpoint import TRAINER_STATE, verify  # noqa: E402

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle"}
SOURCES = sorted((REPO_ROOT / "trainer").rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Every unsafe deserialisation or dynamic-code call in `source`, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module it stands for (import x as y)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in PICKLERS:
            loaders = [a.name for a in node.names if a.name in ("load", "loads", "Unpickler")]
            if loaders:
                found.append(f"{filename}:{node.lineno}: from {node.module} import {loaders}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            _dotted(base).rpartition(".")[2] == "Unpickler" for base in node.bases
        ):
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            if "find_class" not in methods:
                found.append(f"{filename}:{node.lineno}: {node.name} without find_class")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        where = f"{filename}:{node.lineno}: {name}("
        if full.rpartition(".")[0] in PICKLERS and full.rpartition(".")[2] in (
            "load",
            "loads",
            "Unpickler",
        ):
            found.append(where)
        elif full == "torch.load" and not _keyword_is_true(node, "weights_only"):
            found.append(f"{where} without weights_only=True")
        elif full in ("numpy.load", "np.load") and any(
            kw.arg == "allow_pickle"
            and not (isinstance(kw.value, ast.Constant) and not kw.value.value)
            for kw in node.keywords
        ):
            found.append(f"{where} allow_pickle")
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
            found.append(where)
    return found


def test_the_scan_finds_what_it_looks_for():
    """The scanner itself: each refused pattern is caught, the harmless look-alikes are not."""
    bad = """
import pickle, torch
import pickle as pk
import numpy as np
from dill import loads
pickle.load(f)
pk.loads(b)
torch.load(p)
torch.load(p, weights_only=False)
np.load(p, allow_pickle=True)
eval("1")
exec("x = 1")
class Loader(pickle.Unpickler):
    pass
"""
    assert len(unsafe_calls(bad, "bad.py")) == 9
    fine = """
import torch, json
torch.load(p, weights_only=True)
model.eval()
json.loads(s)
# pickle.load(f) in a comment, eval( in a docstring
class Allowlist(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(name)
\"\"\"torch.load(x) and exec(y)\"\"\"
"""
    assert unsafe_calls(fine, "fine.py") == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_unsafe_deserialisation_or_dynamic_code(path):
    assert unsafe_calls(path.read_text(), str(path.relative_to(REPO_ROOT))) == []


def test_sources_were_found():
    assert len(SOURCES) > 20 and any(p.name == "checkpoint.py" for p in SOURCES)


class _Stateful(Callback):
    """Callback state of the kinds callbacks keep: tensors, numbers, strings, lists, dicts."""

    def state_dict(self):
        return {"best": torch.tensor(0.5), "wait": 3, "mode": "min", "history": [1.0, 2.0]}


def test_checkpoint_files_load_with_weights_only(tmp_path):
    schedule = {"_target_": "trainer.callbacks.lr_schedule.WarmupCosine", "warmup_steps": 2}
    trainer = make_trainer(
        tmp_path,
        optim=ADAMW,
        schedule=schedule,
        max_steps=3,
        checkpoint={"save_final": True},
        callbacks=[_Stateful()],
    )
    trainer.fit()
    folder = tmp_path / "checkpoints" / "step_00000003"
    verify(folder)
    state = torch.load(folder / TRAINER_STATE, weights_only=True)
    assert state["state"]["step"] == 3
    assert state["callbacks"]["1:_Stateful"]["mode"] == "min"
    rng = torch.load(folder / "rng_rank0.pt", weights_only=True)
    assert set(rng) >= {"torch", "numpy", "python"}
    assert rng["torch"].dtype == torch.uint8
