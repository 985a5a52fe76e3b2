"""Shared test setup: wandb never goes online, torch stays on one thread, and `run_cli` runs the
real `hooktrain` command (`python -m trainer`) in a subprocess with that same environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.* (fault injection, helpers) import as a package

# wandb offline and quiet; one intra-op thread so that parallel test processes share 2 cores.
TEST_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread in this process too: bit-for-bit comparisons with a reference
    computed in the same test need the same reduction order, and tests share 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # a developer's key would turn wandb on


def cli_env() -> dict[str, str]:
    """os.environ plus TEST_ENV, with the checkout importable and Hydra's short error format."""
    env = {**os.environ, **TEST_ENV}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("WANDB_API_KEY", None)  # a developer's key would turn wandb on
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_cli(
    args: Sequence[str],
    cwd: str | os.PathLike[str],
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m trainer *args` in `cwd` (use a tmp folder) and capture its output as text;
    `env`: variables set on top of `cli_env()`."""
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def fault_table():
    """The table of injected faults (docs/faults.md), written at the end of the session when
    $HOOKTRAIN_FAULT_TABLE names a file."""
    from tests import faults

    yield from faults.fault_table_fixture()


@pytest.fixture
def record_fault(request, fault_table):
    """`record_fault(fault, injected, happened)`: this test's row of the fault table."""
    from tests import faults

    yield from faults.record_fault_fixture(request, fault_table)
