"""Batch norm on the reference models: folding into the layer before it
(`trainer.compress.batchnorm`) against the eval-mode model it came from, which layer each
BatchNorm follows in a model's data flow, and what tensor parallelism makes of the option."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.nn.modules.batchnorm import _BatchNorm

from tests.helpers import make_trainer
from trainer.build import build_trainer
from trainer.cli import recipes_dir
from trainer.compress.batchnorm import batchnorm_pairs, fold_batchnorm
from trainer.config import ConfigError, validate
from trainer.distributed.env import DistEnv
from trainer.distributed.parallelize import tensor_parallel_plan
from trainer.models import CNN

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

MODELS = {
    "cnn1d": ({"_target_": "trainer.models.CNN", "channels": [4, 8], "hidden": 16}, [1, 16]),
    "cnn2d": ({"_target_": "trainer.models.CNN", "channels": [4, 8], "hidden": 0}, [1, 8, 8]),
    "mlp": ({"_target_": "trainer.models.MLP", "hidden": [16, 12]}, [8]),
}


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


# ------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("kind", MODELS)
def test_folded_model_computes_the_eval_model_without_batchnorm(tmp_path, kind):
    node, shape = MODELS[kind]
    trainer = make_trainer(
        tmp_path, model={**node, "batch_norm": True}, dataset={"input_shape": shape}
    )
    steps = trainer.fit().step  # running statistics and affine parameters far from their init
    model = trainer.model
    assert steps > 10 and all(int(bn.num_batches_tracked) == steps for bn in _norms(model))
    assert all(
        not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in _norms(model)
    )
    before = copy.deepcopy(model.state_dict())

    folded = fold_batchnorm(model)

    pairs = batchnorm_pairs(model)
    assert len(pairs) == 2 and not _norms(folded)
    assert all(isinstance(folded.get_submodule(n), nn.Identity) for n in pairs.values())
    x = torch.randn(64, *shape)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    # The BatchNorms' gamma and beta are gone; a layer without a bias gained one.
    removed = sum(p.numel() for bn in _norms(model) for p in bn.parameters())
    added = sum(
        model.get_submodule(layer).weight.shape[0]
        for layer in pairs
        if model.get_submodule(layer).bias is None
    )
    count = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in folded.parameters()) == count - removed + added
    # The input is untouched: its BatchNorms, its weights and its statistics.
    assert len(_norms(model)) == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Residual(nn.Module):
    """A user's block: bn1 is registered before the conv it follows, and conv2's output feeds
    both bn2 and the sum, so bn2 cannot fold into conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(4)
        self.conv1 = nn.Conv1d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.bn2(z) + z


def test_pairs_follow_the_data_flow_not_the_attribute_order():
    torch.manual_seed(0)
    model = Residual()
    model.train()
    for _ in range(3):
        model(torch.randn(16, 2, 10) + 1)
    assert batchnorm_pairs(model) == {"conv1": "bn1"}
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.BatchNorm1d)
    x = torch.randn(8, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) if x.sum() > 0 else self.fc(x)  # data-dependent


def test_a_model_torch_fx_cannot_trace_is_refused_by_name():
    with pytest.raises(ValueError, match="^Branchy has BatchNorm layers, but torch.fx cannot"):
        batchnorm_pairs(Branchy())
    assert batchnorm_pairs(nn.Sequential(nn.Linear(4, 4))) == {}  # no BatchNorm: no trace


# ------------------------------------------------------------------------------- tensor parallel


def test_tensor_parallel_refuses_the_mlp_with_batch_norm(tmp_path, monkeypatch):
    """`parallel=tp model=mlp model.batch_norm=true`: one line naming the BatchNorm between the
    pair of Linears tp would split, before anything trains."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    overrides = ["parallel=tp", "model=mlp", "model.batch_norm=true", "model.hidden=[16]"]
    overrides += ["data=synthetic", "data.dataset.num_samples=160", "logger=none"]
    overrides += ["callbacks=none", "device=cpu"]
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = validate(compose(config_name="train", overrides=overrides))
    with pytest.raises(ConfigError) as info:
        build_trainer(cfg, ENV, tmp_path)
    assert str(info.value).startswith(
        "parallel.strategy: MLP's layer net.2 (BatchNorm1d) sits between net.1 and net.5"
    )


def test_the_cnn_head_plan_is_the_same_with_batch_norm():
    for batch_norm in (False, True):
        model = CNN(input_shape=(1, 16), num_classes=4, channels=(4, 8), batch_norm=batch_norm)
        plan = tensor_parallel_plan(model)
        assert {k: type(v) for k, v in plan.items()} == {
            "classifier.1": ColwiseParallel,
            "classifier.4": RowwiseParallel,
        }
        assert all(isinstance(model.get_submodule(name), nn.Linear) for name in plan)
