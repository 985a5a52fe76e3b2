"""Fault injection for the fault tests: callbacks and a logger that break a run FOR REAL.

Configs name them as `_target_: tests.faults.X` (the CLI accepts them once `allowed_targets`
includes `tests.` and the checkout is on PYTHONPATH, as `conftest.run_cli` and `cli_env` arrange):

    +callbacks.kill._target_=tests.faults.KillOnce +callbacks.kill.step=10
    +logger.broken._target_=tests.faults.BrokenLogger

Every fault is real: a signal sent to the process itself with `os.kill`, an exception raised on
one rank, a NaN written into the model's input, a logger whose backend raises `OSError`. What each
test then observed is collected into `FAULT_TABLE`, which `docs/faults.md` is generated from.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.callbacks.base import Callback
from trainer.loggers.base import Logger
from trainer.state import TrainState

# ------------------------------------------------------------------------------- processes


class KillOnce(Callback):
    """SIGKILL this very process at the end of step `step` on rank `rank` -- only in the first
    attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT == "0"), so the restarted job runs on.

    `record`: a file to which every rank appends one JSON line at `on_fit_start` (rank, restart
    count, the step the fit starts from), so a test can see where the restarted job resumed.
    """

    def __init__(self, step: int, rank: int = 1, record: str | None = None) -> None:
        self.step = step
        self.rank = rank
        self.record = record

    def on_fit_start(self, state: TrainState) -> None:
        if self.record:
            _append_json(
                self.record,
                {
                    "rank": state.rank,
                    "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT"),
                    "start_step": state.step,
                },
            )

    def on_step_end(self, state: TrainState) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        if state.step == self.step and state.rank == self.rank and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)


class SendSignal(Callback):
    """Send the real signal `signal` (a name: SIGTERM, SIGUSR1) to this process while step
    `step` is running (from `on_step_start`, before its forward), on `rank` (None: every rank)."""

    def __init__(self, signal: str, step: int, rank: int | None = None) -> None:
        self.signum = _signum(signal)
        self.step = step
        self.rank = rank

    def on_step_start(self, state: TrainState) -> None:
        if state.step + 1 == self.step and self.rank in (None, state.rank):
            os.kill(os.getpid(), self.signum)


class RaiseOnRank(Callback):
    """Raise `RuntimeError(message)` at the end of step `step` on rank `rank`."""

    def __init__(self, step: int, rank: int = 1, message: str = "injected failure") -> None:
        self.step = step
        self.rank = rank
        self.message = message

    def on_step_end(self, state: TrainState) -> None:
        if state.step == self.step and state.rank == self.rank:
            raise RuntimeError(f"{self.message} (rank {state.rank}, step {state.step})")


class NaNInput(Callback):
    """Write a NaN into the first input sample of every training step in `steps` (1-based, the
    step's number once done), on `rank` (None: every rank), through a forward pre-hook on the
    model. Evaluation forwards (the model in eval mode) are left alone."""

    def __init__(self, steps: Sequence[int], rank: int | None = None) -> None:
        self.steps = {int(s) for s in steps}
        self.rank = rank
        self.current = 0  # the step being computed
        self.injected: list[int] = []
        self._handle: Any = None

    def on_fit_start(self, state: TrainState) -> None:
        if self.rank in (None, state.rank):
            self._handle = state.model.register_forward_pre_hook(self._hook)

    def on_step_start(self, state: TrainState) -> None:
        self.current = state.step + 1

    def on_fit_end(self, state: TrainState) -> None:
        self._remove()

    def on_exception(self, state: TrainState, error: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not module.training or self.current not in self.steps:
            return None
        inputs = args[0].clone()
        inputs[0] = float("nan")
        self.injected.append(self.current)
        return (inputs, *args[1:])


class WeightWatch(Callback):
    """Records which steps changed the weights and which left them bit-identical (a skipped
    step), and the step the fit started from (after any resume)."""

    def __init__(self) -> None:
        self.unchanged: list[int] = []
        self.changed: list[int] = []
        self.before: dict[str, torch.Tensor] = {}
        self.start_step: int | None = None

    def on_fit_start(self, state: TrainState) -> None:
        self.start_step = state.step

    def on_step_start(self, state: TrainState) -> None:
        self.before = snapshot(state.model)

    def on_step_end(self, state: TrainState) -> None:
        after = snapshot(state.model)
        same = all(torch.equal(after[k], v) for k, v in self.before.items())
        (self.unchanged if same else self.changed).append(state.step)


class BrokenLogger(Logger):
    """A logging backend that is down: `log_metrics` raises `OSError` (from call `fail_from`
    on, counting from 1); `log_config` and `finish` work."""

    def __init__(self, fail_from: int = 1) -> None:
        self.fail_from = fail_from
        self.calls = 0

    def log_metrics(self, metrics: Any, step: int) -> None:
        self.calls += 1
        if self.calls >= self.fail_from:
            raise OSError(f"injected outage: metrics backend unreachable at step {step}")


# ------------------------------------------------------------------------------- helpers


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _append_json(path: str, row: dict[str, Any]) -> None:
    # One small O_APPEND write per line: lines of several ranks never interleave.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _signum(name: str) -> signal.Signals:
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


# ------------------------------------------------------------------------------- the table

TABLE_ENV = "HOOKTRAIN_FAULT_TABLE"
TABLE_COMMAND = (
    "HOOKTRAIN_FAULT_TABLE=docs/faults.md python -m pytest "
    "tests/distributed/test_faults.py tests/unit/test_nonfinite.py"
)


class FaultTable:
    """One row per fault test, filled in by the test with what it observed."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, fault: str, injected: str, happened: str, test: str) -> None:
        self.rows.append((fault, injected, happened, test))

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return " ".join(text.split()).replace("|", "\\|")

        lines = [
            "# Fault injection: what breaks, and what hooktrain does about it",
            "",
            "```bash",
            TABLE_COMMAND,
            "```",
            "",
            "This file is written by the command above: every row comes from a fault test, with the",
            "values that test observed. The faults are injected for real (`tests/faults.py`: callbacks",
            "and a logger that configs name as `_target_: tests.faults.X`); a row whose test failed",
            "in the generating run says so instead of describing an outcome.",
            "",
            "| fault | how it was injected | what happened | test |",
            "|---|---|---|---|",
        ]
        lines += [f"| {' | '.join(cell(c) for c in row)} |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.markdown(), encoding="utf-8")


FAULT_TABLE = FaultTable()


def fault_table_fixture() -> Iterator[FaultTable]:
    """Body of the session-scoped `fault_table` fixture (tests/conftest.py): yields the shared
    table and, at the end of the session, writes it to $HOOKTRAIN_FAULT_TABLE when that is set."""
    yield FAULT_TABLE
    path = os.environ.get(TABLE_ENV)
    if path and FAULT_TABLE.rows:
        FAULT_TABLE.write(path)


def record_fault_fixture(request: Any, table: FaultTable) -> Iterator[Any]:
    """Body of the `record_fault` fixtures: yields `add(fault, injected, happened)` for this
    test's row; a test that ends without adding one (it failed) gets a row saying so."""
    test = request.node.nodeid
    before = len(table.rows)

    def add(fault: str, injected: str, happened: str) -> None:
        table.add(fault, injected, happened, test)

    yield add
    if len(table.rows) == before:
        name = request.node.name.removeprefix("test_").replace("_", " ")
        table.add(name, "see the test", "**FAILED in the generating run**: not observed", test)
