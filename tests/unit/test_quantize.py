"""Post-training int8 quantization (`trainer.compress.quantize`) against torchao applied directly
to the same weights in each test, the float model, and its artifact on disk."""

from __future__ import annotations

import copy
import importlib.util
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.pt2e_reference import pt2e_static_reference
from trainer.checkpoint import CheckpointError
from trainer.compress.quantize import (
    MODES,
    load_quantized,
    quantize,
    require_torchao,
    save_quantized,
    torchao_problem,
)
from trainer.config import ConfigError
from trainer.models import CNN, MLP

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed"
)
SHAPE = (1, 40)  # one MNIST-1D sample


def _batches(n: int, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *SHAPE, generator=gen) for _ in range(n)]


def _model(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(input_shape=SHAPE, num_classes=10).eval()


# ----------------------------------------------------------------------------------- the guard


def test_guard_names_what_is_wrong_and_the_fix():
    missing = torchao_problem("2.13.0+cpu", None)
    assert "torchao" in missing and "not installed" in missing
    assert "pip install 'torchao>=0.18,<0.19'" in missing
    old_ao = torchao_problem("2.13.0", "0.17.1")
    assert "torchao >= 0.18" in old_ao and "0.17.1" in old_ao and "pip install" in old_ao
    old_torch = torchao_problem("2.10.1+cu128", "0.18.0")
    assert "torch >= 2.11" in old_torch and "2.10.1+cu128" in old_torch
    assert "upgrade torch" in old_torch
    assert torchao_problem("2.11.0", "0.18.0") is None
    assert torchao_problem("2.13.0+cpu", "0.18.0") is None
    assert torchao_problem("3.0.0", "0.18.0") is None  # (3, 0) is newer than (2, 11)


@needs_torchao
def test_guard_passes_here_and_bad_input_is_one_clear_error(tmp_path):
    require_torchao()  # this environment has torchao 0.18 on torch >= 2.11
    empty = nn.Sequential(nn.Flatten(), nn.ReLU())
    for mode in MODES:
        with pytest.raises(ValueError, match=r"Sequential has no .*Linear.* nothing to quantize"):
            quantize(empty, mode, _batches(1))
    conv_only = nn.Sequential(
        nn.Conv1d(1, 4, 3), nn.Flatten()
    )  # static quantizes it; the others not
    with pytest.raises(ConfigError, match="no Linear layer"):
        quantize(conv_only, "dynamic")
    with pytest.raises(ConfigError, match="at least one calibration batch"):
        quantize(_model(CNN), "static", [])
    with pytest.raises(ConfigError, match="'int4' is not one of"):
        quantize(_model(MLP), "int4")
    with pytest.raises(ValueError, match="a MLP is not a 'static' model"):
        save_quantized(_model(MLP), "static", tmp_path / "model.pt")
    assert not list(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------------- against torchao


@needs_torchao
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_torchao_modes_match_quantize_applied_directly(mode):
    from torch._inductor import config as inductor_config
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    model = _model(MLP)
    before = copy.deepcopy(model.state_dict())

    def inductor_settings():
        # Without the pre-grad pass, which importing torchao's x86 PT2E quantizer sets (the
        # module's docstring says so) and which the copy cannot compare.
        settings = inductor_config.get_config_copy()
        settings.pop("pre_grad_custom_pass")
        return settings

    inductor_before = inductor_settings()
    quantized = quantize(model, mode)
    reference = copy.deepcopy(model)
    config = {"dynamic": Int8DynamicActivationInt8WeightConfig, "weight_only": Int8WeightOnlyConfig}
    quantize_(reference, config[mode](set_inductor_config=False))
    x = _batches(1, size=33)[0]
    with torch.no_grad():  # the same torchao kernels on the same int8 tensors: bit for bit
        assert torch.equal(quantized(x), reference(x))
    # The float model is untouched, and so are the process-wide inductor settings.
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert inductor_settings() == inductor_before


@needs_torchao
def test_static_matches_the_pt2e_calls_with_the_same_calibration():

    model = _model(CNN)  # Conv1d and Linear layers
    calibration = _batches(3)
    quantized = quantize(model, "static", calibration)

    reference = pt2e_static_reference(model, calibration)
    with torch.no_grad():
        for size in (5, 64):  # the batch dimension stayed dynamic
            x = torch.randn(size, *SHAPE)
            assert torch.equal(quantized(x), reference(x))
    # The float weights that the converted graph no longer reads are gone from the model.
    assert set(quantized.state_dict()) < set(reference.state_dict())
    assert not any(
        t.dtype == torch.float32 and t.dim() >= 2 for t in quantized.state_dict().values()
    )


# ----------------------------------------------------------------------------------- against float


@needs_torchao
def test_quantized_predictions_agree_with_the_float_model():
    """A sanity check on a briefly trained MLP: argmax agreement with fp32 on held-out inputs."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(40, 10, generator=gen)
    x = torch.randn(3072, *SHAPE, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(1)
    model = _model(MLP).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        for xb, yb in zip(x[:2048].split(256), y[:2048].split(256), strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    model.eval()
    held_out = x[2048:]
    with torch.no_grad():
        expected = model(held_out).argmax(1)
        assert (expected == y[2048:]).float().mean() > 0.8  # trained enough to mean something
        for mode in MODES:
            quantized = quantize(model, mode, list(x[:1024].split(256)))
            agreement = (quantized(held_out).argmax(1) == expected).float().mean()
            assert agreement > 0.95, (mode, float(agreement))


# ----------------------------------------------------------------------------------- the artifact


@needs_torchao
@pytest.mark.parametrize(("cls", "mode"), [(MLP, "dynamic"), (MLP, "weight_only"), (CNN, "static")])
def test_artifact_reloads_weights_only_to_identical_outputs(tmp_path, cls, mode):
    from torch.serialization import _weights_only_unpickler

    model = _model(cls)
    quantized = quantize(model, mode, _batches(2))
    path = save_quantized(quantized, mode, tmp_path / "model.pt")
    # Only tensors and plain values: every global the file names is torch's own weights-only
    # set or one of the torchao classes `load_quantized` allowlists.
    with zipfile.ZipFile(path) as archive:
        pickled = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        names = _weights_only_unpickler.get_globals_in_pkl(archive.open(pickled))
    torch_safe = set(_weights_only_unpickler._get_allowed_globals())
    torchao_needed = {
        "torchao.quantization.Int8Tensor",
        "torchao.quantization.quantize_.workflows.int8.int8_tensor.QuantizeTensorToInt8Kwargs",
        "torchao.quantization.granularity.PerRow",
        "torchao.quantization.quant_primitives.MappingType",
    }
    assert names - torch_safe <= torchao_needed

    other_weights = _model(cls, seed=7)  # the architecture only: all its weights get replaced
    loaded = load_quantized(path, other_weights)
    x = torch.randn(9, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    assert all(type(p) is nn.Parameter for p in other_weights.parameters())  # left as it was

    with pytest.raises(CheckpointError, match="does not fit"):
        wider = cls(input_shape=SHAPE, num_classes=12)
        load_quantized(path, wider)


class _Payload:
    """Unpickling this creates the sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


@needs_torchao
def test_a_crafted_pickle_in_place_of_the_artifact_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    sentinel = tmp_path / "pwned"
    torch.save({"mode": "dynamic", "tensors": _Payload(sentinel)}, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: not a loadable quantized model"):
        load_quantized(path, _model(MLP))
    assert not sentinel.exists()
    with pytest.raises(CheckpointError, match="no quantized model file"):
        load_quantized(tmp_path / "absent.pt", _model(MLP))


@needs_torchao
def test_deployed_size_is_at_least_3_5x_smaller_than_fp32(tmp_path):
    torch.manual_seed(0)
    model = MLP(input_shape=(256,), num_classes=10, hidden=(256, 256)).eval()
    dense = tmp_path / "fp32.pt"
    torch.save(model.state_dict(), dense)
    calibration = [torch.randn(64, 256)]
    for mode in MODES:
        path = save_quantized(quantize(model, mode, calibration), mode, tmp_path / f"{mode}.pt")
        ratio = dense.stat().st_size / path.stat().st_size
        assert ratio >= 3.5, (mode, ratio)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_a_linear_of_one_input_feature_stays_float(mode):
    # torchao 0.18's per-row int8 fails on in_features == 1 (a transformer's scalar embedding).
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    quantized = quantize(model, mode)
    assert type(quantized[0].weight) is nn.Parameter and quantized[0].weight.dtype == torch.float32
    assert type(quantized[2].weight.data) is not torch.Tensor  # a torchao int8 tensor
    x = torch.randn(32, 1)
    assert quantized(x).shape == (32, 4)
