"""`parallelize(model, cfg, env) -> model`: wrap a built model for the chosen strategy.

    none      one process (under torchrun, use one of the others)
    ddp       DistributedDataParallel: full replicas, gradients all-reduced
    fsdp      FSDP2 `fully_shard` on each block, then on the root (ZeRO-3 style sharding)
    tp        tensor parallel over all ranks: q/k/v and fc1 colwise, o and fc2 rowwise
    fsdp_tp   2-D mesh (dp, tp): tensor parallel inside each tp group, FSDP2 across dp

Everything here is PyTorch's own engine (DeviceMesh, fully_shard, parallelize_module); this file
only wires it. The optimizer is built after this, from the wrapped model's parameters.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from trainer.config import ParallelConfig
from trainer.distributed.env import DistEnv, dtype_of


def build_mesh(cfg: ParallelConfig, env: DistEnv) -> tuple[DeviceMesh | None, DistEnv]:
    """The device mesh for the strategy, and `env` with its data-parallel coordinates filled in.

    Ranks in one tensor-parallel group must read the same batch, so the loaders shard data by the
    data-parallel rank, not the global rank.
    """
    if not env.is_distributed:
        return None, env
    dp, tp = cfg.degrees(env.world_size)  # refuses strategy none, or degrees that do not fit
    mesh = init_device_mesh(env.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    dp_mesh = mesh["dp"]
    return mesh, env.with_data_parallel(
        dp_rank=dp_mesh.get_local_rank(), dp_size=dp, dp_group=dp_mesh.get_group()
    )


def parallelize(
    model: nn.Module, cfg: ParallelConfig, env: DistEnv, mesh: DeviceMesh | None
) -> nn.Module:
    model = model.to(env.device)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is None:
        return model  # a world of one: the same recipe runs as a plain single-process debug run
    if cfg.strategy == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if cfg.strategy in ("tp", "fsdp_tp"):
        parallelize_module(model, mesh["tp"], tensor_parallel_plan(model))
    if cfg.strategy in ("fsdp", "fsdp_tp"):
        apply_fsdp(model, mesh["dp"], cfg)
    return model


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, cfg: ParallelConfig) -> None:
    """FSDP2 on each block (one all-gather per block), then the root for what is left."""
    kwargs = {
        "mesh": dp_mesh,
        "reshard_after_forward": cfg.reshard_after_forward,
        # Compute in param_dtype, but reduce gradients in fp32 so small updates are not lost.
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=dtype_of(cfg.param_dtype), reduce_dtype=dtype_of("fp32")
        ),
    }
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in shard_units(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one: a model's `blocks`, else its direct children."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return [m for m in model.children() if any(p.requires_grad for p in m.parameters())]


def tensor_parallel_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """Which Linear layers to shard. A model may bring its own `tp_plan()`; otherwise the plan
    follows the reference models' names (`trainer/models/attention.py` documents them):
    attention q/k/v and mlp.fc1 colwise, attention o and mlp.fc2 rowwise, so each block needs
    one all-reduce after attention and one after the MLP. Embeddings and the head stay replicated.
    """
    custom = getattr(model, "tp_plan", None)
    if callable(custom):
        return custom()
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        plan: dict[str, ParallelStyle] = {}
        for i in range(len(blocks)):
            for name in ("attn.q", "attn.k", "attn.v", "mlp.fc1"):
                plan[f"blocks.{i}.{name}"] = ColwiseParallel()
            for name in ("attn.o", "mlp.fc2"):
                plan[f"blocks.{i}.{name}"] = RowwiseParallel()
        return plan
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) >= 2 and not any(
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.RNNBase)) for m in model.modules()
    ):
        # An MLP: pair consecutive Linear layers colwise -> rowwise; an odd last one (the head)
        # stays replicated.
        plan = {}
        for first, second in zip(linears[0::2], linears[1::2], strict=False):
            plan[first] = ColwiseParallel()
            plan[second] = RowwiseParallel()
        return plan
    raise ValueError(
        f"parallel.strategy: {type(model).__name__} has no tensor-parallel plan; give it a "
        "`tp_plan()` method, or use parallel=ddp or parallel=fsdp"
    )


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"parallel.activation_checkpointing: {type(model).__name__} has no `blocks` to checkpoint"
        )
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP or torch.compile (FSDP2 and TP modify the module in place)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
