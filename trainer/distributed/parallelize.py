"""`parallelize(model, cfg, env) -> model`: wrap a built model for the chosen strategy.

The optimizer is built after this, from the wrapped model's parameters.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config import ParallelConfig
from trainer.distributed.env import DistEnv


def parallelize(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    model = model.to(env.device)
    if not env.is_distributed:
        return model  # a world of one: the same recipe runs as a plain single-process debug run
    if cfg.strategy == "none":
        raise RuntimeError(
            f"parallel.strategy=none but the world has {env.world_size} processes; "
            "use parallel=ddp under torchrun"
        )
    if cfg.strategy == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    raise ValueError(f"parallel.strategy: unknown strategy {cfg.strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside any wrapper (DDP, torch.compile)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
