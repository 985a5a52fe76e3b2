"""Process-group setup and the few collectives the loop needs.

torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR) decides the world; a plain
`python -m trainer` is a world of one and starts no process group at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainer.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # Data-parallel coordinates: equal to rank/world_size unless tensor parallelism makes groups of
    # ranks share one batch (see distributed/parallelize.py: build_mesh).
    dp_rank: int | None = None
    dp_size: int | None = None
    dp_group: dist.ProcessGroup | None = None  # None: all ranks

    def __post_init__(self) -> None:
        if self.dp_rank is None:
            object.__setattr__(self, "dp_rank", self.rank)
        if self.dp_size is None:
            object.__setattr__(self, "dp_size", self.world_size)

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def with_data_parallel(
        self, dp_rank: int, dp_size: int, dp_group: dist.ProcessGroup
    ) -> DistEnv:
        return replace(self, dp_rank=dp_rank, dp_size=dp_size, dp_group=dp_group)


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but CUDA is not available (use auto or cpu)")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str, backend: str, timeout_s: int) -> DistEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(world_size, timeout)
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
            **({"store": store, "rank": rank, "world_size": world_size} if store else {}),
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


# torchrun (torch >= 2.5) hands its workers the agent's own rendezvous TCPStore
# (TORCHELASTIC_USE_AGENT_STORE), which outlives the workers, and torch connects to it without a
# per-attempt prefix: a restarted group can read the dead group's addresses before the new
# ones are written, and gloo then fails with "connectFullMesh failed ... Connection refused"
# (pytorch/pytorch#135712). On one node TORCHELASTIC_RESTART_COUNT is the same for every worker
# of an attempt, so it makes the prefix. On several nodes it is not (an agent whose workers
# were healthy restarts them without counting), so restarts there need the store switched off.
def _shares_agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _refuse_restarts_across_nodes() -> None:
    """What no prefix makes safe: torchrun restarts on several nodes with the shared store on."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if restarts and nodes > 1 and _shares_agent_store():
        raise ConfigError(
            f"torchrun --max-restarts={restarts} on {nodes} nodes: set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node (launch/multinode.sh does), or a "
            "restarted group can read the previous attempt's addresses and fail to connect"
        )


def _attempt_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """This attempt's keys in torchrun's shared store, or None: init_process_group's own."""
    if not _shares_agent_store():
        return None
    _refuse_restarts_across_nodes()
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"hooktrain/attempt_{attempt}", shared)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str, backend: str, timeout_s: int) -> Iterator[DistEnv]:
    """`init_distributed` for the body; the process group is torn down only if the body succeeds.

    On an exception the process exits with the group still up: a graceful teardown would first
    close this rank's connections, so that its peers fail with "connection closed" and the
    launcher could report their echo instead of this rank's original error.
    """
    env = init_distributed(device, backend, timeout_s)
    yield env
    teardown()


def several_ranks() -> bool:
    """Whether a process group with more than one rank is running: collectives are then due."""
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `tensor` over the ranks of `group` (default: all) in place and return it."""
    if several_ranks():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def start_all_reduce_sum(tensor: torch.Tensor) -> dist.Work | None:
    """Start summing `tensor` over all ranks in place; `.wait()` the work returned (None: one
    process) before reading it. All ranks, not a data-parallel group: what it carries (the stop
    flags) must reach every rank."""
    if several_ranks():
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    return None


def all_reduce_max(value: int, device: torch.device) -> int:
    if not several_ranks():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank if it is true on any rank: how stop and save are agreed."""
    if not several_ranks():
        return list(flags)
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; itself in one process."""
    if not several_ranks():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if several_ranks():
        dist.barrier()
