"""`parallelize(model, cfg, env) -> model`: wrap a built model for the chosen strategy.

    none      one process (under torchrun, use one of the others)
    ddp       DistributedDataParallel: full replicas, gradients all-reduced
    fsdp      FSDP2 `fully_shard` on each block, then on the root (ZeRO-3 style sharding)
    tp        tensor parallel over all ranks (`tensor_parallel_plan`): in each block q/k/v and fc1
              colwise, o and fc2 rowwise (transformer, gpt); the MLP's Linear pairs; the CNN's
              head fc pair; the GRU's head
    fsdp_tp   2-D mesh (dp, tp): tensor parallel inside each tp group, FSDP2 across dp

`parallel.sync_batchnorm` turns BatchNorm layers into SyncBatchNorm before DDP wraps the model.

Everything here is PyTorch's own engine (DeviceMesh, fully_shard, parallelize_module); this file
only wires it. The optimizer is built after this, from the wrapped model's parameters.
"""

from __future__ import annotations

import torch
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
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from trainer.config import ConfigError, ParallelConfig
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
    # Decided from the bare model, in one process too: a debug run refuses what torchrun would.
    if cfg.sync_batchnorm:
        check_sync_batchnorm(model, env.device)
    plan = tensor_parallel_plan(model) if cfg.strategy in ("tp", "fsdp_tp") else None
    if plan is not None and mesh is not None:
        parallelize_module(model, mesh["tp"], plan)
    # After tensor parallelism, as torchtitan does: the plan names the blocks' own submodules,
    # which checkpoint_wrapper would hide behind `_checkpoint_wrapped_module`.
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is None:
        return model  # a world of one: the same recipe runs as a plain single-process debug run
    if cfg.strategy == "ddp":
        if cfg.sync_batchnorm:  # before wrapping: DDP sets its SyncBatchNorm layers up itself
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
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
    if cfg.param_dtype != "fp32":
        # BatchNorm's running statistics stay fp32, and its kernel refuses a bf16 weight beside
        # them ("expected scalar type BFloat16 but found Float"): each BatchNorm is its own FSDP2
        # unit computing in fp32 (its input cast up) and handing param_dtype on to the next layer.
        fp32 = dtype_of("fp32")
        policy = MixedPrecisionPolicy(
            param_dtype=fp32, reduce_dtype=fp32, output_dtype=dtype_of(cfg.param_dtype)
        )
        for norm in [m for m in model.modules() if isinstance(m, _BatchNorm)]:
            fully_shard(norm, **{**kwargs, "mp_policy": policy})
    for block in shard_units(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def check_sync_batchnorm(model: nn.Module, device: torch.device) -> None:
    """`parallel.sync_batchnorm` needs BatchNorm layers, and a GPU: torch's SyncBatchNorm
    computes its statistics on GPUs only (torch 2.13: DDP refuses it on CPU modules, "SyncBatchNorm
    layers only work with GPU modules", and its forward refuses CPU inputs)."""
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise ConfigError(
            f"parallel.sync_batchnorm: {type(model).__name__} has no BatchNorm layer to "
            "synchronize (the reference CNN and MLP have them with model.batch_norm=true); set "
            "it to false"
        )
    if device.type == "cpu":
        raise ConfigError(
            "parallel.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only, and this run is "
            "on the CPU; set it to false (each rank then normalizes by its own share of the "
            "batch)"
        )


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one: a model's `blocks`, else its direct children."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return [m for m in model.children() if any(p.requires_grad for p in m.parameters())]


def tensor_parallel_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """Which Linear layers to shard. A model may bring its own `tp_plan()` (the CNN shards its
    head's fc pair, the GRU its head); otherwise the plan follows the reference models' names
    (`trainer/models/attention.py` documents them): in each of `blocks`, attention q/k/v and
    mlp.fc1 colwise, attention o and mlp.fc2 rowwise, so each block needs one all-reduce after
    attention and one after the MLP; embeddings and the head stay replicated. A model without
    blocks, convolutions or recurrence has its Linear layers paired (`linear_pairs_plan`).
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
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2 or any(
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.RNNBase)) for m in model.modules()
    ):
        raise ConfigError(
            f"parallel.strategy: {type(model).__name__} has no tensor-parallel plan; give it a "
            "`tp_plan()` method, or use parallel=ddp or parallel=fsdp"
        )
    return linear_pairs_plan(model)


# Modules that act on each element alone, so they may sit between a colwise Linear (its output
# features split across the ranks) and the rowwise one that gathers them.
ELEMENTWISE = (
    nn.Identity,
    nn.Dropout,
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Mish,
)


def linear_pairs_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """An MLP's plan: consecutive Linear layers paired colwise -> rowwise (an odd last one, the
    head, stays replicated). Between the two of a pair each rank holds only its share of the
    features, so only elementwise modules may sit there: a norm over the features (BatchNorm,
    LayerNorm) would see a part of them, and the model is refused. Order is registration order,
    which is the forward's in an `nn.Sequential`."""
    leaves = [(name, m) for name, m in model.named_modules() if not any(m.children())]
    at = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.Linear)]
    plan: dict[str, ParallelStyle] = {}
    for first, second in zip(at[0::2], at[1::2], strict=False):
        for name, module in leaves[first + 1 : second]:
            if not isinstance(module, ELEMENTWISE):
                raise ConfigError(
                    f"parallel.strategy: {type(model).__name__}'s layer {name} "
                    f"({type(module).__name__}) sits between {leaves[first][0]} and "
                    f"{leaves[second][0]}, which tensor parallelism pairs, and would see only "
                    "this rank's share of the features; give the model a `tp_plan()` method, "
                    "or use parallel=ddp or parallel=fsdp"
                )
        plan[leaves[first][0]] = ColwiseParallel()
        plan[leaves[second][0]] = RowwiseParallel()
    return plan


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(
            f"parallel.activation_checkpointing: {type(model).__name__} has no `blocks` "
            "(an nn.ModuleList) to checkpoint; set it to false"
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
