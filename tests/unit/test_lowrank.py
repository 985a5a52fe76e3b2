"""Low-rank factorization (`trainer.compress.lowrank`) against references computed in each test:
the original layer's outputs, torch.linalg.svdvals' spectrum, the break-even formula, parameter
counts from the modules and FLOPs from torch's FlopCounterMode."""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from trainer.compress import apply_plan, factorize, rank_for_energy, rank_for_ratio
from trainer.compress.lowrank import factor_pair, fill_factors, svd
from trainer.models import CNN, MLP

LAYERS = {
    "linear": (lambda: nn.Linear(12, 7), (5, 12)),
    "linear-nobias": (lambda: nn.Linear(9, 14, bias=False), (5, 3, 9)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1, dilation=2), (2, 3, 17)),
    "conv2d": (
        lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
        (2, 3, 11, 9),
    ),
    "conv2d-circular": (
        lambda: nn.Conv2d(2, 4, 3, padding=1, bias=False, padding_mode="circular"),
        (2, 2, 6, 6),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=2), (1, 2, 4, 4, 4)),
}

# Small reference models and one input each: MNIST-1D-like vectors and 8x8 digits.
REFERENCE = {
    "mlp": (lambda: MLP(input_shape=(40,), num_classes=10), (40,)),
    "cnn1d": (lambda: CNN(input_shape=(40,), num_classes=10), (40,)),
    "cnn2d": (lambda: CNN(input_shape=(1, 8, 8), num_classes=10), (1, 8, 8)),
}


def _reference(key: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    build, shape = REFERENCE[key]
    torch.manual_seed(seed)
    return build(), torch.randn(4, *shape)


def _spectrum_layer(m: int, n: int, decay: float, seed: int = 0) -> nn.Linear:
    """A Linear (n -> m) whose weight has singular values decay**i."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(decay ** torch.arange(k).float()) @ v.T)
    return layer


# ------------------------------------------------------------------------------- factors


@pytest.mark.parametrize("key", list(LAYERS))
def test_full_rank_factors_reproduce_the_layer(key):
    build, shape = LAYERS[key]
    torch.manual_seed(0)
    layer = build()
    m, n = layer.weight.shape[0], layer.weight[0].numel()
    pair = factor_pair(layer, min(m, n))
    fill_factors(pair, layer, *svd(layer))
    x = torch.randn(*shape)
    torch.testing.assert_close(pair(x), layer(x), rtol=1e-4, atol=1e-5)


def test_factorize_keeps_the_trained_weights():
    # A weight of exact rank 3: the rank-3 factors from factorize reproduce the layer.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 3) @ torch.randn(3, 20))
    original = copy.deepcopy(model)
    report = factorize(model, example=torch.randn(1, 20), energy=0.999, exclude=[r"^2$"])
    assert report["plan"] == {"0": 3}
    x = torch.randn(8, 20)
    torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-5)


def test_dtype_is_kept():
    model = nn.Sequential(nn.Linear(32, 32)).to(torch.bfloat16)
    factorize(model, example=torch.randn(1, 32, dtype=torch.bfloat16), ratio=0.25)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_modes_and_batch_norm_statistics_are_kept():
    model = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Linear(32, 32)).train()
    model[2].eval()
    factorize(model, example=torch.randn(4, 32), ratio=0.25)
    assert model[0][0].training and model[1].training and not model[2][1].training
    assert int(model[1].num_batches_tracked) == 0  # the counting forward ran in eval mode


# ------------------------------------------------------------------------------- ranks


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.9, 0.99])
def test_energy_rank_is_the_smallest_keeping_it(energy):
    layer = _spectrum_layer(40, 64, decay=0.85)
    model = nn.Sequential(layer, nn.ReLU(), _spectrum_layer(10, 40, decay=0.5, seed=1))
    s = torch.linalg.svdvals(layer.weight.detach().double())
    kept = (s.square().cumsum(0) / s.square().sum()).tolist()
    expected = next((r for r in range(1, len(kept) + 1) if kept[r - 1] >= energy), len(kept))
    assert rank_for_energy(s, energy) == expected
    report = factorize(model, example=torch.randn(1, 64), energy=energy)
    record = report["layers"]["0"]
    assert record["rank"] == expected
    assert record["energy"] == pytest.approx(kept[expected - 1], abs=1e-6)
    assert record["energy"] >= energy - 1e-6
    if expected > 1:
        assert kept[expected - 2] < energy


def test_energy_one_keeps_the_full_rank_despite_rounding():
    # cumsum and sum round differently: for some spectra sum(s[:k]^2) / sum(s^2) ends below 1.
    g = torch.Generator().manual_seed(0)
    spectra = [torch.rand(50, generator=g, dtype=torch.float64) for _ in range(40)]
    short = [s for s in spectra if (s.square().cumsum(0) / s.square().sum())[-1] < 1]
    assert short, "no spectrum with rounding below 1 to test"
    for s in spectra:
        assert rank_for_energy(s, 1.0) == len(s)


@pytest.mark.parametrize("full", [1, 3, 25, 50, 100, 257])
@pytest.mark.parametrize("ratio", [0.07, 0.14, 0.28, 0.3, 0.5, 0.999, 1.0])
def test_ratio_rank_is_the_ceiling(ratio, full):
    # Exact arithmetic for the reference: 0.07 * 100 is 7.000000000000001 in floats.
    assert rank_for_ratio(full, ratio) == max(1, math.ceil(Fraction(str(ratio)) * full))


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: nn.Linear(10, 10), (10,)),
        (lambda: nn.Linear(24, 8), (24,)),
        (lambda: nn.Linear(3, 16), (3,)),
        (lambda: nn.Conv1d(2, 9, 3), (2, 7)),
        (lambda: nn.Conv2d(3, 12, 3, padding=1), (3, 5, 5)),
    ],
)
def test_break_even_leaves_a_layer_alone_exactly_when_it_does_not_pay(build, shape):
    torch.manual_seed(0)
    layer = build()
    m, n = layer.weight.shape[0], layer.weight[0].numel()
    full = min(m, n)
    for rank in range(1, full + 1):
        model = nn.Sequential(copy.deepcopy(layer))
        kwargs = {"example": torch.randn(1, *shape), "ratio": rank / full}
        if rank * (m + n) < m * n:
            report = factorize(model, **kwargs)
            assert report["layers"]["0"]["rank"] == rank
            assert isinstance(model[0], nn.Sequential), rank
        else:
            with pytest.raises(ValueError, match="does not pay"):
                factorize(model, **kwargs)
            assert type(model[0]) is type(layer), rank


# ------------------------------------------------------------------------------- counts


def _flops(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total and per-module FLOPs of model(x) from FlopCounterMode."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    root = type(model).__name__
    per_module = {
        name.removeprefix(root + "."): sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
    }
    return counter.get_total_flops(), per_module


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("key", list(REFERENCE))
@pytest.mark.parametrize("kwargs", [{"ratio": 0.5}, {"energy": 0.9}])
def test_report_counts_match_the_modules_and_flop_counter(key, kwargs):
    model, batch = _reference(key)
    original = copy.deepcopy(model)
    one = batch[:1]
    report = factorize(model, example=batch[:2], **kwargs)  # per sample: divided by the batch
    before_total, before = _flops(original, one)
    after_total, after = _flops(model, one)
    assert report["params"] == {"before": _numel(original), "after": _numel(model)}
    assert report["flops"] == {"before": before_total, "after": after_total}
    assert report["plan"] == {n: r["rank"] for n, r in report["layers"].items() if r["factorized"]}
    for name, record in report["layers"].items():
        assert record["params"]["before"] == _numel(original.get_submodule(name))
        assert record["params"]["after"] == _numel(model.get_submodule(name))
        assert record["flops"] == {"before": before[name], "after": after[name]}
        assert record["factorized"] == isinstance(model.get_submodule(name), nn.Sequential)
    json.dumps(report)  # JSON-ready for the run's report


@pytest.mark.parametrize("key", list(REFERENCE))
def test_reference_models_train_after_factorizing(key):
    model, batch = _reference(key)
    report = factorize(model, example=batch[:1], ratio=0.5)
    assert report["params"]["after"] < report["params"]["before"]
    assert report["flops"]["after"] < report["flops"]["before"]
    model.train()
    out = model(batch)
    assert out.shape == (4, 10)
    loss = nn.functional.cross_entropy(out, torch.arange(4))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    factor_grads = [model.get_submodule(f"{n}.0").weight.grad for n in report["plan"]]
    assert all(g.abs().sum() > 0 for g in factor_grads)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(batch), torch.arange(4)) < loss


# ------------------------------------------------------------------------------- resume


def test_plan_rebuilds_the_structure_for_a_checkpoint():
    model, batch = _reference("cnn2d")
    report = factorize(model, example=batch[:1], ratio=0.5)
    plan = json.loads(json.dumps(report["plan"]))  # as a checkpoint's metadata would store it
    fresh, _ = _reference("cnn2d", seed=1)
    apply_plan(fresh, plan).load_state_dict(model.state_dict())  # strict: same keys and shapes
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(batch), model(batch))


def test_factorize_is_repeatable():
    # Identical weights, one machine, one thread count: bitwise identical factors.
    w = torch.randn(64, 96)
    first, second = torch.linalg.svd(w, full_matrices=False), torch.linalg.svd(w.clone(), False)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    model, batch = _reference("mlp")
    twin = copy.deepcopy(model)
    factorize(model, example=batch[:1], energy=0.9)
    factorize(twin, example=batch[:1], energy=0.9)
    mine, theirs = model.state_dict(), twin.state_dict()
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        assert torch.equal(value, theirs[name]), name


@pytest.mark.parametrize(
    "plan, match",
    [
        ({"features.9": 2}, "'features.9'"),
        ({"features.1": 2}, "ReLU"),
        ({"classifier.4": 11}, "10"),
    ],
)
def test_bad_plan_names_the_layer(plan, match):
    model, _ = _reference("cnn2d")
    with pytest.raises(ValueError, match=match):
        apply_plan(model, {"classifier.1": 4, **plan})
    assert isinstance(model.classifier[1], nn.Linear)  # checked before anything changed


# ------------------------------------------------------------------------------- left alone


class Mixed(nn.Module):
    """Layers factorize must not replace: a tied head, MultiheadAttention's out_proj, a grouped
    conv; and one plain Linear that it may."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        x = self.mha(x, x, x, need_weights=False)[0]
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.fc(x))


def test_layers_that_must_not_change_are_left_alone_with_a_reason():
    torch.manual_seed(0)
    model = Mixed()
    tokens = torch.randint(0, 10, (2, 5))
    report = factorize(model, example=tokens, ratio=0.25)
    reasons = {n: r.get("reason") for n, r in report["layers"].items()}
    assert reasons["fc"] is None and report["plan"] == {"fc": 2}
    assert "shared with emb" in reasons["head"]
    assert "MultiheadAttention" in reasons["mha.out_proj"]
    assert "groups=2" in reasons["conv"]
    assert model.head.weight is model.emb.weight
    assert model(tokens).shape == (2, 5, 10)


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"energy": 0}, "energy must be in \\(0, 1\\], got 0"),
        ({"energy": 1.5}, "energy must be in \\(0, 1\\], got 1.5"),
        ({"energy": float("nan")}, "energy"),
        ({"ratio": -1}, "ratio must be in \\(0, 1\\], got -1"),
        ({"ratio": 0.5, "energy": 0.9}, "exactly one of energy or ratio"),
        ({}, "exactly one of energy or ratio"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    model, batch = _reference("mlp")
    with pytest.raises(ValueError, match=match):
        factorize(model, example=batch[:1], **kwargs)


class EmbeddingOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb(tokens)


def test_nothing_to_factorize_names_the_model():
    with pytest.raises(ValueError, match="EmbeddingOnly: nothing to factorize: it has no Linear"):
        factorize(EmbeddingOnly(), example=torch.zeros(1, 3, dtype=torch.long), ratio=0.5)
    model, batch = _reference("mlp")
    with pytest.raises(ValueError, match=r"MLP: nothing to factorize: net\.1: excluded by 'net'"):
        factorize(model, example=batch[:1], ratio=0.5, exclude=["net"])


def test_wrapped_or_sharded_models_are_refused(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        wrapped, batch = _reference("mlp")
        wrapped = DistributedDataParallel(wrapped)
        sharded, _ = _reference("mlp")
        fully_shard(sharded)
        for model in (wrapped, sharded):
            with pytest.raises(ValueError, match="wrapped or sharded; pass the plain module"):
                factorize(model, example=batch[:1], ratio=0.5)
            with pytest.raises(ValueError, match="wrapped or sharded"):
                apply_plan(model, {"net.1": 2})
    finally:
        dist.destroy_process_group()
