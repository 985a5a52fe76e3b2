"""Structured pruning of any model through Torch-Pruning's dependency graph
(`trainer.pruning.graph`, `Pruning(method="structured")`): the reference MLP and CNN, a user's
residual CNN, `nn.MultiheadAttention` and the project's transformer. References computed here:
the masked model's outputs, parameter counts from the kept channels, a fresh model reloaded from
the weights-only file."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tests.pruning_models import (
    AttentionClassifier,
    FusedAttentionClassifier,
    ResNet1d,
    pruning_config,
)
from trainer.build import build_trainer
from trainer.config import ConfigError
from trainer.distributed.env import DistEnv
from trainer.models import CNN, MLP
from trainer.models.transformer import TransformerClassifier
from trainer.pruning import graph as G
from trainer.pruning.shrink import check_exact, load_pruned, save_pruned
from trainer.pruning.stages import MODEL_FILE

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
CLASSES = 5

# name: (model, input shape); each prunes half of every group, the output layer kept.
MODELS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "mlp": (lambda: MLP(input_shape=(12,), num_classes=CLASSES, hidden=(16, 12)), (12,)),
    "cnn_bn": (
        lambda: CNN(
            input_shape=(1, 16), num_classes=CLASSES, channels=(4, 8), hidden=8, batch_norm=True
        ),
        (1, 16),
    ),
    "cnn2d": (
        lambda: CNN(input_shape=(1, 8, 8), num_classes=CLASSES, channels=(4, 8), hidden=0),
        (1, 8, 8),
    ),
    "resnet": (lambda: ResNet1d(input_shape=(2, 16), num_classes=CLASSES), (2, 16)),
    # sigmoid(0) != 0: exact because the next layer's columns are masked too
    "sigmoid": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, CLASSES)), (6,)),
    "mha": (lambda: AttentionClassifier(input_shape=(5, 6), num_classes=CLASSES), (5, 6)),
    "transformer": (
        lambda: TransformerClassifier(
            input_shape=(6, 4), num_classes=CLASSES, dim=16, depth=2, heads=4
        ),
        (6, 4),
    ),
}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    make, shape = MODELS[kind]
    model = make()
    with torch.no_grad():  # BatchNorms far from their init: statistics of a few batches
        for norm in (m for m in model.modules() if isinstance(m, _BatchNorm)):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
        model.train()
        for _ in range(3):
            model(3 * torch.randn(16, *shape) + 1)
    return model.eval()


def _pruned(kind: str):
    model = _model(kind)
    x = torch.randn(32, *MODELS[kind][1])
    output_layer = [
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ][-1]
    groups, skipped = G.channel_groups(model, x[:2], ignored=[output_layer])
    removed = G.choose(groups, dict(model.named_parameters()), 0.5)
    masks = G.group_masks(groups, removed, {n: p.shape for n, p in model.named_parameters()})
    return model, x, groups, skipped, removed, masks


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_params(kind: str, model: nn.Module, groups, removed) -> int | None:
    """The shrunk model's parameter count from its kept channels, by the architecture."""
    kept = {g.root: g.channels - len(removed[g.root]) for g in groups}
    if kind == "resnet":  # residual channels r (one group for stem and both blocks), inner k_i
        (r,) = {kept[root] for root in kept if root.endswith("conv2")}
        inner = [kept[f"blocks.{i}.conv1"] for i in range(2)]
        blocks = sum(r * k * 3 + 2 * k + k * r * 3 + 2 * r for k in inner)
        return (2 * r * 3 + r) + blocks + (r * CLASSES + CLASSES)
    if kind == "mha":  # embed, in_proj, out_proj, head at the kept width e
        (e,) = kept.values()
        return (6 * e + e) + (3 * e * e + 3 * e) + (e * e + e) + (e * CLASSES + CLASSES)
    if kind == "transformer":  # each block loses its pruned heads' q/k/v/o and fc1/fc2 units
        dim, gone = 16, 0
        for i in range(2):
            heads = len(removed[f"blocks.{i}.attn.v"])
            hidden = len(removed[f"blocks.{i}.mlp.fc1"])
            gone += 3 * heads * (dim + 1) + heads * dim + hidden * (dim + 1) + hidden * dim
        return _count(model) - gone
    return None


@pytest.mark.parametrize("kind", MODELS)
def test_shrunk_model_computes_the_masked_models_outputs(kind):
    model, x, groups, skipped, removed, masks = _pruned(kind)
    masked = G.masked_copy(model, masks)
    small = check_exact(model, groups, removed, x[:2])
    with torch.no_grad():
        gap = (small.eval()(x) - masked.eval()(x)).abs().max().item()
    assert gap < 1e-5, gap
    # Exactly the masked entries are gone, and the count follows from the kept channels.
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert _count(small) == _count(model) - zeros < _count(model)
    expected = _expected_params(kind, model, groups, removed)
    assert expected is None or _count(small) == expected
    for group in groups:  # half of each group's units: whole heads of attention
        assert len(removed[group.root]) == round(0.5 * group.units) * (
            group.channels // group.units
        )
    if kind == "transformer":  # the residual width goes through LayerNorms: it is kept
        assert set(skipped) == {"blocks.1.mlp.fc2"} and "LayerNorm" in skipped["blocks.1.mlp.fc2"]
        assert small.blocks[0].attn.q.out_features == 8  # 2 of 4 heads of 4 channels
    if kind == "mha":  # Torch-Pruning leaves num_heads: shrink sets it, the head size stays
        assert (small.attn.num_heads, small.attn.head_dim, small.attn.embed_dim) == (2, 4, 8)
        small.attn.num_heads = 4  # as Torch-Pruning leaves it: 4 heads of 2, silently wrong
        with torch.no_grad():
            assert (small(x) - masked(x)).abs().max() > 1e-3
    if kind in ("resnet", "cnn_bn"):  # a pruned channel is zero after its BatchNorm
        for name, norm in masked.named_modules():
            if isinstance(norm, _BatchNorm):
                dead = ~masks[f"{name}.weight"]
                for training in (True, False):
                    seen: dict[str, torch.Tensor] = {}
                    hook = norm.register_forward_hook(
                        lambda m, a, out, seen=seen: seen.update(out=out)
                    )
                    with torch.no_grad():
                        masked.train(training)(x)
                    hook.remove()
                    assert torch.count_nonzero(seen["out"][:, dead]) == 0


@pytest.mark.parametrize("kind", ["resnet", "transformer"])
def test_saved_shrunk_model_reloads_into_a_fresh_model(kind, tmp_path):
    model, x, groups, _, removed, _ = _pruned(kind)
    small = check_exact(model, groups, removed, x[:2])
    path = save_pruned(tmp_path / "pruned.pt", small, removed, x[:1])
    torch.load(path, weights_only=True)  # plain tensors and lists: no pickled code
    fresh = load_pruned(MODELS[kind][0](), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), small.eval()(x))
    with pytest.raises(ValueError, match="not a pruned model file"):
        torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
        load_pruned(MODELS[kind][0](), tmp_path / "other.pt")


def test_what_cannot_be_shrunk_exactly_is_refused_naming_it(tmp_path):
    # A fused qkv split by the module's own num_heads: pruned channels regroup the heads.
    cfg = pruning_config(
        tmp_path,
        {"method": "structured", "scope": "layer"},
        input_shape=(5, 6),
        model={"_target_": "tests.pruning_models.FusedAttentionClassifier"},
    )
    with pytest.raises(ConfigError, match=r"callbacks\.pruning: .*FusedHeads 'attn'"):
        build_trainer(cfg, ENV, tmp_path)
    grouped = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.ReLU(), nn.Conv1d(4, 3, 1))
    with pytest.raises(ValueError, match=r"'0': grouped Conv1d"):
        G.channel_groups(grouped, torch.randn(2, 2, 8), ignored=["2"])
    assert FusedAttentionClassifier  # the model the config names


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        ({"_target_": "trainer.models.MLP"}, (64,)),
        ({"_target_": "tests.pruning_models.ResNet1d"}, (2, 16)),
        ({"_target_": "trainer.models.TransformerClassifier", "dim": 16, "depth": 1}, (8, 4)),
    ],
)
def test_trainer_prunes_structurally_and_exports_the_shrunk_model(tmp_path, model, shape):
    pruning = {"method": "structured", "scope": "layer", "finetune_epochs": 1}
    pruning["report_dir"] = str(tmp_path / "out")
    cfg = pruning_config(tmp_path, pruning, input_shape=shape, model=model, max_epochs=2)
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    (cb,) = trainer.callbacks
    state = trainer.fit()
    rows = {row["stage"]: row for row in state.compression.rows}
    assert list(rows) == ["dense", "pruned", "fine-tuned"]
    assert cb.final_step == state.steps_per_epoch  # pruned before the fine-tune epoch
    assert rows["pruned"]["params"] == rows["fine-tuned"]["params"] == cb.report["shrunk_params"]
    assert rows["fine-tuned"]["params"] < rows["dense"]["params"]
    assert rows["fine-tuned"]["flops_per_sample"] < rows["dense"]["flops_per_sample"]
    # The file: the shrunk model, rebuilt from a fresh dense model of the same config.
    net = trainer.model.eval()
    fresh = load_pruned(
        type(net)(input_shape=shape, num_classes=10, **_args(model)), tmp_path / "out" / MODEL_FILE
    )
    x = torch.randn(16, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), net(x), rtol=1e-4, atol=1e-5)
    assert _count(fresh) == cb.report["shrunk_params"]
    if model["_target_"] == "trainer.models.MLP":  # half of each hidden layer, classes kept
        shapes = cb.report["shrunk_shapes"]
        assert shapes["net.1.weight"] == [128, 64] and shapes["net.4.weight"] == [128, 128]
        assert shapes["net.7.weight"] == [10, 128]
    assert math.isfinite(rows["pruned"]["val_accuracy"])


def _args(model: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model.items() if k != "_target_"}
