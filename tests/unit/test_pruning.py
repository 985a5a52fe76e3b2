"""Pruning (`trainer.pruning`, `trainer.callbacks.pruning.Pruning`) against references computed in
each test: exact counts, torch.nn.utils.prune's own masks, the cubic schedule's closed form, the
masked model's outputs, and an uninterrupted run for resume."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.callbacks.pruning import MODEL_FILE, REPORT_FILE, SHRUNK_FILE, Pruning
from trainer.compress.batchnorm import batchnorm_pairs
from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig
from trainer.distributed.env import DistEnv
from trainer.models import CNN, MLP
from trainer.pruning import masks as M
from trainer.pruning.report import cpu_latency_ms, csr_bytes, size_report
from trainer.pruning.shrink import export, parameter_count, shrink
from trainer.state import TrainState

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
PRUNING = "trainer.callbacks.pruning.Pruning"


def _weights(seed: int = 0, ties: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (16, 12), "b.weight": (8, 4, 3), "c.weight": (10, 16)}
    out = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}
    if ties:  # few distinct magnitudes, both signs: many exact ties
        out = {n: torch.randint(-3, 4, w.shape, generator=g).float() for n, w in out.items()}
    return out


def _kept_and_pruned(weights, masks, names):
    kept = torch.cat([weights[n].abs()[masks[n]] for n in names])
    pruned = torch.cat([weights[n].abs()[~masks[n]] for n in names])
    return kept, pruned


# ------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.9, 0.97])
def test_layer_masks_exact_and_keep_largest(sparsity, ties):
    weights = _weights(ties=ties)
    masks = M.unstructured_masks(weights, sparsity, scope="layer")
    for name, w in weights.items():
        mask = masks[name]
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert int((~mask).sum()) == round(sparsity * w.numel()), name
        kept, pruned = _kept_and_pruned(weights, masks, [name])
        if len(kept) and len(pruned):
            assert kept.min() >= pruned.max(), name


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8, 0.9])
def test_global_masks_exact_with_one_threshold(sparsity, ties):
    weights = _weights(seed=1, ties=ties)
    weights["c.weight"] *= 3  # layers of different scale: per-layer sparsities differ
    masks = M.unstructured_masks(weights, sparsity, scope="global")
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    kept, pruned = _kept_and_pruned(weights, masks, list(weights))
    assert kept.min() >= pruned.max()
    per_layer = {n: 1 - m.float().mean().item() for n, m in masks.items()}
    assert per_layer["c.weight"] < sparsity < per_layer["a.weight"]


def test_masks_equal_torch_prune():
    """Without ties the masks are exactly those of torch.nn.utils.prune's functions."""
    weights = _weights(seed=2)
    layers = {n: nn.Linear(1, 1) for n in weights}
    for n, layer in layers.items():
        layer.weight = nn.Parameter(weights[n].clone())
    prune.global_unstructured(
        [(m, "weight") for m in layers.values()], prune.L1Unstructured, amount=0.7
    )
    masks = M.unstructured_masks(weights, 0.7, scope="global")
    for n, layer in layers.items():
        assert torch.equal(masks[n], layer.weight_mask.bool()), n
    for n, w in weights.items():
        module = nn.Linear(1, 1)
        module.weight = nn.Parameter(w.clone())
        prune.ln_structured(module, "weight", amount=0.5, n=2, dim=0)
        assert torch.equal(M.structured_masks({n: w}, 0.5)[n], module.weight_mask.bool()), n


def test_previous_masks_are_kept_and_counts_stay_exact():
    weights = _weights(seed=3)
    for scope in ("layer", "global"):
        first = M.unstructured_masks(weights, 0.5, scope=scope)
        moved = {n: w + 0.5 * torch.randn_like(w) for n, w in weights.items()}  # training
        second = M.unstructured_masks(moved, 0.8, scope=scope, previous=first)
        for n in weights:
            assert not (second[n] & ~first[n]).any(), "a pruned weight came back"
        total = sum(w.numel() for w in weights.values())
        if scope == "global":
            assert sum(int((~m).sum()) for m in second.values()) == round(0.8 * total)
        else:
            for n, w in weights.items():
                assert int((~second[n]).sum()) == round(0.8 * w.numel())
        # Among the weights alive before, the largest are kept (per layer, or over all).
        for group in [[n] for n in weights] if scope == "layer" else [list(weights)]:
            kept = torch.cat([moved[n].abs()[second[n]] for n in group])
            newly = torch.cat([moved[n].abs()[first[n] & ~second[n]] for n in group])
            assert kept.min() >= newly.max()


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_structured_masks_drop_whole_rows_of_smallest_norm(sparsity, norm):
    weights = _weights(seed=4)
    masks = M.structured_masks(weights, sparsity, norm=norm)
    for name, w in weights.items():
        rows = masks[name].flatten(1)
        assert (rows.all(1) | ~rows.any(1)).all(), "a row is partly pruned"
        alive = rows.all(1)
        assert int((~alive).sum()) == round(sparsity * w.shape[0])
        norms = w.flatten(1).norm(p=norm, dim=1)
        assert norms[alive].min() >= norms[~alive].max()
    # Gradual: the rows pruned before stay pruned, and the count is exact.
    more = M.structured_masks(weights, min(sparsity + 0.3, 1.0), norm=norm, previous=masks)
    for name in weights:
        assert not (more[name] & ~masks[name]).any()


def test_prunable_layers_and_exclude():
    model = CNN(input_shape=(1, 40), num_classes=10)
    names = [n for n, _ in M.prunable_layers(model)]
    assert names == ["features.0", "features.3", "classifier.1", "classifier.4"]
    assert [n for n, _ in M.prunable_layers(model, exclude=[r"classifier\.4"])] == names[:3]
    assert [n for n, _ in M.prunable_layers(model, structured=True)] == names[:3]
    mlp = MLP(input_shape=(8,), num_classes=3, hidden=(6, 5))
    assert [n for n, _ in M.prunable_layers(mlp, exclude=["^net.1$"])] == ["net.4", "net.7"]


# ------------------------------------------------------------------------------- schedule


def _closed_form(t, s_i, s_f, t0, dt, n):
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize(
    ("s_i", "s_f", "t0", "dt", "n"), [(0.0, 0.9, 10, 5, 8), (0.2, 0.8, 0, 3, 1)]
)
def test_cubic_schedule_against_closed_form(s_i, s_f, t0, dt, n):
    def s(t):
        return M.cubic_sparsity(t, final=s_f, initial=s_i, start=t0, every=dt, num_prunes=n)

    steps = M.pruning_steps(t0, dt, n)
    assert steps == [t0 + k * dt for k in range(n + 1)]
    assert s(t0) == s_i and s(t0 + n * dt) == pytest.approx(s_f, abs=1e-15)
    for t in steps:
        assert s(t) == pytest.approx(_closed_form(t, s_i, s_f, t0, dt, n), abs=1e-15)
    values = [s(t) for t in range(t0 + n * dt + 20)]
    assert values == sorted(values)  # monotone
    for t in range(t0, t0 + n * dt + 20):
        last = max(x for x in steps if x <= t)
        assert s(t) == s(last)  # constant between pruning steps (and after the last)
    assert all(s(t) == 0.0 for t in range(t0))


# ------------------------------------------------------------------------------- a real Trainer


def _config(tmp_path: Path, pruning: dict[str, Any], **top: Any) -> TrainConfig:
    fields: dict[str, Any] = {
        "data": DataConfig(
            dataset={"_target_": "trainer.data.datasets.synthetic", "num_samples": 512},
            batch_size=32,
            eval_batch_size=128,
        ),
        "model": {"_target_": "trainer.models.MLP"},
        "optim": {"_target_": "torch.optim.AdamW", "lr": 3e-3},
        "schedule": None,
        "parallel": ParallelConfig(),
        "callbacks": {"pruning": {"_target_": PRUNING, "latency_repeats": 3, **pruning}},
        "logger": {},
        "checkpoint": CheckpointConfig(save_final=False),
        "device": "cpu",
        "max_epochs": 4,
        "log_every_steps": 4,
        "test_after_fit": False,
    }
    fields.update(top)
    return TrainConfig(**fields)


def _fit(tmp_path: Path, pruning: dict[str, Any], extra: list[Callback] = (), **top: Any):
    trainer, _ = build_trainer(_config(tmp_path, pruning, **top), ENV, tmp_path)
    trainer.callbacks.extend(extra)
    return trainer, trainer.fit()


def _weight_sparsity(model: nn.Module, names: list[str]) -> float:
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    return 1 - sum(int(torch.count_nonzero(params[n])) for n in names) / total


class Sparsities(Callback):
    """The sparsity of the pruned weights after every step (placed after Pruning)."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning = pruning
        self.by_step: dict[int, float] = {}

    def on_step_end(self, state: TrainState) -> None:
        self.by_step[state.step] = _weight_sparsity(state.model, self.pruning._weights)


def test_trainer_gradual_pruning_reaches_target(tmp_path):
    pruning = {
        "schedule": "gradual",
        "sparsity": 0.9,
        "start_epoch": 1,
        "every_steps": 3,
        "finetune_epochs": 1,
        "report_dir": str(tmp_path / "report"),
    }
    trainer, _ = build_trainer(_config(tmp_path, pruning), ENV, tmp_path)
    (cb,) = trainer.callbacks
    probe = Sparsities(cb)
    trainer.callbacks.append(probe)
    state = trainer.fit()

    spe = state.steps_per_epoch  # 409 train samples // 32 = 12
    t0, end = spe, state.max_steps - spe
    n = (end - t0) // 3
    assert cb.pruned_steps[0] == t0 + 3 and cb.pruned_steps[-1] == t0 + n * 3 <= end
    names = cb._weights
    total = sum(dict(trainer.model.named_parameters())[k].numel() for k in names)
    final = round(0.9 * total) / total
    assert _weight_sparsity(trainer.model, names) == pytest.approx(final, abs=1e-12)
    assert state.metrics["pruning/sparsity"] == pytest.approx(final, abs=1e-12)
    # Each step's sparsity follows the schedule (up to rounding), and never decreases.
    for step, seen in probe.by_step.items():
        expected = M.cubic_sparsity(step - 1, final=0.9, start=t0, every=3, num_prunes=n)
        assert seen == pytest.approx(expected, abs=2 / total), step
    values = [probe.by_step[s] for s in sorted(probe.by_step)]
    assert values == sorted(values)
    # The report: in state.metrics (-> the loggers) and on disk, with the exported model.
    report = cb.report
    assert report["sparsity"] == pytest.approx(final, abs=1e-12)
    assert set(report["layers"]) == set(names)
    # Accuracy is measured through state.measure just before the first prune and at the
    # end of the fine-tune.
    before, after = report["accuracy"]["before"], report["accuracy"]["after"]
    assert before["source"] == after["source"] == "evaluated"
    assert before["step"] == cb.pruned_steps[0] and after["step"] == state.max_steps
    assert 0 <= before["val/accuracy"] <= 1 and 0 <= after["val/accuracy"] <= 1
    assert (tmp_path / "report" / REPORT_FILE).is_file()
    assert (tmp_path / "report" / MODEL_FILE).is_file()
    assert report["size_bytes"]["sparse_csr"] < report["size_bytes"]["dense"]
    assert state.metrics["pruning/accuracy/after/val/accuracy"] == after["val/accuracy"]


class MaskProbe(Callback):
    """Before Pruning's on_step_end: the optimizer moved pruned weights (nonzero updates);
    after it: they are exactly zero again."""

    def __init__(self, pruning: Pruning, expect_zero: bool) -> None:
        self.pruning, self.expect_zero = pruning, expect_zero
        self.checked = 0

    def on_step_end(self, state: TrainState) -> None:
        if not self.pruning.masks:
            return
        params = dict(state.model.named_parameters())
        pruned = torch.cat([params[n].detach()[~m] for n, m in self.pruning.masks.items()])
        if self.expect_zero:
            assert torch.count_nonzero(pruned) == 0, f"step {state.step}"
        else:
            assert torch.count_nonzero(pruned) > 0.9 * pruned.numel(), f"step {state.step}"
        self.checked += 1


@pytest.mark.parametrize("method", ["unstructured", "structured"])
def test_masks_are_held_through_finetuning(tmp_path, method):
    pruning = {"sparsity": 0.6, "finetune_epochs": 2, "method": method, "scope": "layer"}
    trainer, _ = build_trainer(_config(tmp_path, pruning, max_epochs=3), ENV, tmp_path)
    (cb,) = trainer.callbacks
    before, after = MaskProbe(cb, expect_zero=False), MaskProbe(cb, expect_zero=True)
    trainer.callbacks[:] = [before, cb, after]
    state = trainer.fit()
    spe = state.steps_per_epoch
    assert cb.pruned_steps == [spe]  # before the first step of the first fine-tune epoch
    assert before.checked == after.checked == 2 * spe
    assert cb.report["accuracy"]["before"]["step"] == spe
    assert cb.report["accuracy"]["after"]["step"] == 3 * spe
    if method == "structured":  # the biases of pruned rows are held at zero too
        params = dict(trainer.model.named_parameters())
        for weight, (bias,) in cb._rows.items():
            dead = ~cb.masks[weight].any(1)
            assert dead.sum() == round(0.6 * len(dead))
            assert torch.count_nonzero(params[bias][dead]) == 0


def test_oneshot_after_training_and_structured_export(tmp_path):
    pruning = {
        "sparsity": 0.5,
        "method": "structured",
        "scope": "layer",
        "report_dir": str(tmp_path / "out"),
    }
    trainer, state = _fit(tmp_path, pruning, max_epochs=1)
    (cb,) = trainer.callbacks
    assert cb.pruned_steps == [state.max_steps]  # on_fit_end, after the last validation
    # The pruned model is evaluated on the spot (state.measure): the same numbers as the
    # trainer's own evaluation of the model it now holds.
    after = cb.report["accuracy"]["after"]
    assert after["step"] == state.max_steps
    assert after["val/accuracy"] == trainer.measure(trainer.val_loader, "val")["val/accuracy"]
    shapes = cb.report["shrunk_shapes"]
    assert shapes["net.1.weight"] == [128, 64] and shapes["net.4.weight"] == [128, 128]
    assert shapes["net.7.weight"] == [10, 128]
    assert cb.report["shrunk_params"] < cb.report["params"]
    # The shrunk export loads (weights_only) into a smaller MLP that computes the same outputs.
    small = MLP(input_shape=(64,), num_classes=10, hidden=(128, 128))
    small.load_state_dict(torch.load(tmp_path / "out" / SHRUNK_FILE, weights_only=True))
    x = torch.randn(32, 64)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), trainer.model.eval()(x), rtol=0, atol=1e-6)


def test_accuracy_before_and_after_through_state_evaluate(tmp_path):
    """With a `measure(split)` on the TrainState, the report holds
    the accuracy of the dense model right before pruning and of the pruned model right after."""
    trainer, _ = build_trainer(_config(tmp_path, {"sparsity": 0.9}, max_epochs=1), ENV, tmp_path)
    (cb,) = trainer.callbacks
    seen: list[tuple[int, float]] = []

    def evaluate(split: str) -> dict[str, float]:  # a quiet evaluation: no hooks, no logging
        loader = {"val": trainer.val_loader, "test": trainer.test_loader}[split]
        model = trainer.model.eval()
        correct = count = 0
        with torch.no_grad():
            for x, y in loader:
                correct += int((model(x).argmax(-1) == y).sum())
                count += len(y)
        seen.append((trainer.state.step, _weight_sparsity(model, cb._weights)))
        return {f"{split}/accuracy": correct / count}

    trainer.state.measure = evaluate
    state = trainer.fit()
    before, after = cb.report["accuracy"]["before"], cb.report["accuracy"]["after"]
    assert before["source"] == after["source"] == "evaluated"
    assert set(before) >= {"val/accuracy", "test/accuracy"} and set(after) >= set(before)
    pruned = pytest.approx(0.9, abs=1e-4)
    assert [sp for _, sp in seen] == [0.0, 0.0, pruned, pruned]  # val, test before; then after
    assert state.metrics["pruning/accuracy/after/test/accuracy"] == after["test/accuracy"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="scope=layer"):
        Pruning(method="structured")
    with pytest.raises(ValueError, match="sparsity"):
        Pruning(sparsity=1.0)
    with pytest.raises(ValueError, match="initial_sparsity"):
        Pruning(sparsity=0.5, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="finetune_epochs"):
        Pruning(finetune_epochs=5).plan(max_steps=40, steps_per_epoch=10)
    with pytest.raises(ValueError, match="start_epoch"):
        Pruning(schedule="gradual", start_epoch=3, finetune_epochs=2).plan(40, 10)


# ------------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip(tmp_path):
    trainer, state = _fit(tmp_path, {"schedule": "gradual", "every_steps": 5}, max_epochs=2)
    (cb,) = trainer.callbacks
    path = tmp_path / "cb.pt"
    torch.save(cb.state_dict(), path)
    fresh = Pruning(schedule="gradual", every_steps=5)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.masks.keys() == cb.masks.keys()
    assert all(torch.equal(fresh.masks[k], cb.masks[k]) for k in cb.masks)
    assert fresh.sparsity == cb.sparsity and fresh.pruned_steps == cb.pruned_steps
    assert fresh.state_dict()["before"] == cb.state_dict()["before"]


class CrashAt(Callback):
    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.at:
            raise RuntimeError(f"simulated crash before step {self.at}")


def test_resumed_run_continues_identically(tmp_path):
    pruning = {"schedule": "gradual", "sparsity": 0.8, "every_steps": 4, "finetune_epochs": 1}
    kw = {"max_epochs": 3, "log_every_steps": 1}
    straight, _ = _fit(tmp_path / "straight", pruning, **kw)

    run = tmp_path / "resumed"
    ckpt = CheckpointConfig(every_steps=10, save_final=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(run, pruning, [CrashAt(15)], checkpoint=ckpt, **kw)
    resumed, state = _fit(run, pruning, [CrashAt(None)], checkpoint=ckpt, resume="auto", **kw)
    cb, ref = resumed.callbacks[0], straight.callbacks[0]
    assert cb.pruned_steps == ref.pruned_steps and cb.pruned_steps[0] < 10 < cb.pruned_steps[-1]
    assert all(torch.equal(cb.masks[k], ref.masks[k]) for k in ref.masks)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert state.metrics["pruning/sparsity"] == straight.state.metrics["pruning/sparsity"]


# ------------------------------------------------------------------------------- shrink, export


def _structurally_pruned(model: nn.Module, sparsity: float) -> nn.Module:
    """The masks the callback applies: rows of the weights, and their biases and BatchNorm
    entries (`row_parameters`)."""
    layers = M.prunable_layers(model, structured=True)
    masks = M.structured_masks({n: m.weight for n, m in layers}, sparsity)
    rows = M.row_masks(masks)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, module in layers:
            module.weight.mul_(masks[name])
            for follower in M.row_parameters(model, layers)[f"{name}.weight"]:
                params[follower].mul_(rows[name])
    return model


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: MLP(input_shape=(40,), num_classes=10, hidden=(64, 48)), (40,)),
        (lambda: CNN(input_shape=(1, 40), num_classes=10, channels=(8, 16), hidden=32), (1, 40)),
        (lambda: CNN(input_shape=(1, 8, 8), num_classes=10, channels=(8, 16), hidden=0), (1, 8, 8)),
    ],
)
def test_shrink_gives_identical_outputs_with_fewer_params(make, shape):
    torch.manual_seed(0)
    model = _structurally_pruned(make().eval(), 0.5)
    small = shrink(model).eval()
    x = torch.randn(64, *shape)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)
    assert parameter_count(small) < 0.5 * parameter_count(model)
    for name, layer in M.prunable_layers(model, structured=True):
        kept = int(layer.weight.flatten(1).any(1).sum())
        assert dict(small.named_modules())[name].weight.shape[0] == kept


# The reference models with BatchNorm: class, arguments, input shape (10 classes).
BATCHNORM_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any], tuple[int, ...]]] = {
    "mlp": (MLP, {"hidden": (64, 48)}, (40,)),
    "cnn1d": (CNN, {"channels": (8, 16), "hidden": 32}, (1, 40)),
    "cnn2d": (CNN, {"channels": (8, 16), "hidden": 0}, (1, 8, 8)),
}


def _batchnorm_model(kind: str, widths: Sequence[int] | None = None) -> nn.Module:
    """The `kind` model with BatchNorm; `widths`: its pruned layers' widths instead."""
    cls, kwargs, shape = BATCHNORM_MODELS[kind]
    if widths is not None:  # the pruned layers: the MLP's hidden Linears; the CNN's convs, fc
        if cls is MLP:
            kwargs = {"hidden": tuple(widths)}
        else:
            kwargs = {"channels": tuple(widths[:2]), "hidden": widths[2] if kwargs["hidden"] else 0}
    return cls(input_shape=shape, num_classes=10, batch_norm=True, **kwargs)


def _kept_widths(model: nn.Module) -> list[int]:
    return [
        int(layer.weight.flatten(1).any(1).sum())
        for _, layer in M.prunable_layers(model, structured=True)
    ]


@pytest.mark.parametrize("kind", BATCHNORM_MODELS)
def test_shrink_removes_batchnorm_entries_with_their_channels(kind):
    shape = BATCHNORM_MODELS[kind][2]
    torch.manual_seed(0)
    model = _batchnorm_model(kind)
    with torch.no_grad():  # BatchNorms far from their init: statistics of a few batches
        for norm in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
        for _ in range(3):
            model(3 * torch.randn(32, *shape) + 1)
    model = _structurally_pruned(model.eval(), 0.5)
    small = shrink(model).eval()
    x = torch.randn(64, *shape)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)
    # The shrunk model is the reference model of the kept widths, its BatchNorms included:
    # the same names and shapes (a strict load), so the same parameter count.
    twin = _batchnorm_model(kind, _kept_widths(model))
    twin.load_state_dict(small.state_dict())
    assert parameter_count(twin) == parameter_count(small) < 0.5 * parameter_count(model)


class BatchNormOutputs(Callback):
    """Hooks every BatchNorm of the model: `outputs[name]` is its latest output."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_hook(self._keep(name))

    def _keep(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output.detach()

        return hook


@pytest.mark.parametrize("kind", ["mlp", "cnn1d"])
def test_structured_pruning_with_batchnorm_zeroes_channels_and_shrinks(tmp_path, kind):
    """A pruned channel is exactly zero after its BatchNorm (whose weight and bias are masked
    with it), in training and in eval; the shrunk model drops the BatchNorm entries too and
    computes the masked model's outputs."""
    cls, kwargs, input_shape = BATCHNORM_MODELS[kind]
    model = {"_target_": f"trainer.models.{cls.__name__}", **kwargs, "batch_norm": True}
    pruning = {"method": "structured", "scope": "layer", "sparsity": 0.5, "finetune_epochs": 1}
    dataset = {"_target_": "trainer.data.datasets.synthetic", "num_samples": 512}
    data = DataConfig(dataset={**dataset, "input_shape": list(input_shape)}, batch_size=32)
    cfg = _config(tmp_path, pruning, model=model, data=data, max_epochs=2)
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    (cb,) = trainer.callbacks
    trainer.fit()
    net = trainer.model
    pairs = {f"{layer}.weight": norm for layer, norm in batchnorm_pairs(net).items()}
    assert len(pairs) == 2  # each hidden Linear or conv; the CNN's hidden fc has none
    for weight in cb._weights:  # masked with the rows: BatchNorm's entries, else the bias
        norm = pairs.get(weight)
        expected = (
            [f"{norm}.weight", f"{norm}.bias"] if norm else [weight[: -len("weight")] + "bias"]
        )
        assert cb._rows[weight] == expected

    probe = BatchNormOutputs(net)
    x = torch.randn(64, *input_shape)
    for training in (True, False):
        with torch.no_grad():
            net.train(training)(x)
        for weight, norm in pairs.items():
            dead = ~cb.masks[weight].flatten(1).any(1)
            assert dead.sum() == round(0.5 * len(dead))
            assert torch.count_nonzero(probe.outputs[norm][:, dead]) == 0, (norm, training)

    net.eval()
    small = shrink(net).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-6)
    twin = _batchnorm_model(kind, _kept_widths(net))
    twin.load_state_dict(small.state_dict())
    assert "shrink_skipped" not in cb.report
    assert cb.report["shrunk_params"] == parameter_count(twin) == parameter_count(small)


def test_shrink_refuses_what_it_cannot_follow():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))  # sigmoid(0) != 0
    with pytest.raises(ValueError, match="Sigmoid"):
        shrink(model)


def test_export_round_trip_preserves_sparsity(tmp_path):
    torch.manual_seed(0)
    model = CNN(input_shape=(1, 40), num_classes=10)
    layers = M.prunable_layers(model)
    masks = M.unstructured_masks({n: m.weight for n, m in layers}, 0.8)
    with torch.no_grad():
        for name, module in layers:
            module.weight.mul_(masks[name])
    path = export(model, tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    fresh = CNN(input_shape=(1, 40), num_classes=10)
    fresh.load_state_dict(state)
    for name, module in dict(fresh.named_modules()).items():
        if name in masks:
            assert torch.equal(module.weight != 0, masks[name]), name
    names = [f"{n}.weight" for n, _ in layers]
    report = size_report(state, names)
    total = sum(state[n].numel() for n in names)
    assert report["sparsity"] == pytest.approx(round(0.8 * total) / total, abs=1e-12)
    x = torch.randn(8, 1, 40)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_report_sizes_and_latency():
    w = torch.zeros(100, 50)
    w[::10, ::5] = 1.0  # 100 nonzeros
    assert csr_bytes(w) == 100 * (4 + 4) + 101 * 4  # values + int32 columns + int32 row starts
    model = MLP(input_shape=(40,), num_classes=10, hidden=(32,))
    ms = cpu_latency_ms(model, torch.randn(16, 40), repeats=5)
    assert 0 < ms < 1000 and math.isfinite(ms)
    assert torch.get_num_threads() == 1


def test_dense_copy_is_untouched_by_shrink():
    model = _structurally_pruned(MLP(input_shape=(8,), num_classes=3, hidden=(6,)), 0.5)
    before = copy.deepcopy(model.state_dict())
    shrink(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
