"""Start N local processes through torchrun's own engine (`elastic_launch`), from Python.

`hooktrain parallel=ddp parallel.nproc_per_node=2` and every job of a sweep
(`hooktrain -m ... parallel.nproc_per_node=2`) use this, so a sweep job is a real multi-process job
with torchrun's rendezvous, environment and failure handling: when one rank raises, the agent
stops the others and the error names the rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def launch(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    max_restarts: int = 0,
    quiet_exits: Collection[int] = (),
) -> dict[int, Any]:
    """Run `fn(*args)` in `nproc` processes on this machine; return {rank: return value}.

    `fn` must be importable by name (a module-level function): the workers are spawned.
    `quiet_exits`: exit codes with which a worker ends having reported its own error; torch's
    launcher logs no traceback for them (the caller reads the error from the ChildFailedError).
    """
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port, as `torchrun --standalone` does
        max_restarts=max_restarts,
        monitor_interval=0.1,  # notice a failed rank within a fraction of a second
        start_method="spawn",
    )
    with _without_tracebacks_for(quiet_exits):
        return elastic_launch(config, _with_threads)(fn, nproc, *args)


@contextlib.contextmanager
def _without_tracebacks_for(exit_codes: Collection[int]) -> Iterator[None]:
    """Drop torch's log record of a worker that ended with one of `exit_codes` (a traceback of the
    launcher's own wait, nothing of the worker's), and the note that the other workers were
    stopped after a failure (the ChildFailedError names the rank that failed)."""

    def keep(record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("failed (exitcode"):
            return record.args[0] not in exit_codes
        return not message.startswith("Terminating process")

    loggers = [
        logging.getLogger("torch.distributed.elastic.multiprocessing.api"),
        logging.getLogger("torch.multiprocessing.spawn"),
    ]
    if exit_codes:
        for logger in loggers:
            logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


def _with_threads(fn: Callable[..., Any], nproc: int, *args: Any) -> Any:
    # torchrun's CLI sets OMP_NUM_THREADS=1 per worker; elastic_launch does not. Split the cores
    # instead of letting every worker spin up one thread per core.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    return fn(*args)
