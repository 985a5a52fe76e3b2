"""Pruning (`trainer.pruning`, `trainer.callbacks.pruning.Pruning`) against references computed in
each test: exact counts, torch.nn.utils.prune's own masks, the cubic schedule's closed form, the
masked model's outputs, and an uninterrupted run for resume. Structured pruning (channel groups,
shrinking): tests/unit/test_pruning_structured.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from tests.faults import SendSignal
from tests.pruning_models import FAST_ROWS, pruning_config
from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.callbacks.pruning import Pruning
from trainer.config import CheckpointConfig
from trainer.distributed.env import DistEnv
from trainer.models import CNN, MLP
from trainer.pruning import masks as M
from trainer.pruning.report import cpu_latency_ms, csr_bytes, size_report
from trainer.pruning.shrink import export, plain_copy
from trainer.pruning.stages import MODEL_FILE
from trainer.state import TrainState

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


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


def _config(tmp_path: Path, pruning: dict[str, Any], **top: Any):
    return pruning_config(tmp_path, pruning, **top)


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
    # The summary: in state.metrics (-> the loggers); the rows of the compression report: the
    # dense model right before the first pruning, at the final sparsity, at the end.
    report = cb.report
    assert report["sparsity"] == pytest.approx(final, abs=1e-12)
    assert set(report["layers"]) == set(names)
    assert report["size_bytes"]["sparse_csr"] < report["size_bytes"]["dense"]
    rows = {row["stage"]: row for row in state.compression.rows}
    assert list(rows) == ["dense", "pruned", "fine-tuned"]
    total_params = sum(p.numel() for p in trainer.model.parameters())
    assert rows["dense"]["nonzeros"] == rows["dense"]["params"] == total_params
    pruned_zeros = round(0.9 * total)
    assert (
        rows["pruned"]["nonzeros"] == rows["fine-tuned"]["nonzeros"] == total_params - pruned_zeros
    )
    assert rows["fine-tuned"]["size_sparse_bytes"] < rows["dense"]["size_bytes"]
    for row in rows.values():
        assert 0 <= row["val_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1
    assert (
        state.metrics["compression/fine-tuned/val_accuracy"] == rows["fine-tuned"]["val_accuracy"]
    )
    # The artifact is the full state dict, zeros included; the report files are written.
    saved = torch.load(tmp_path / "report" / MODEL_FILE, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in trainer.model.state_dict().items())
    assert (tmp_path / "report" / "compression_report.json").is_file()


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
    pruning["latency_repeats"] = 0  # no report rows: only the masks are looked at here
    trainer, _ = build_trainer(_config(tmp_path, pruning, max_epochs=3), ENV, tmp_path)
    (cb,) = trainer.callbacks
    before, after = MaskProbe(cb, expect_zero=False), MaskProbe(cb, expect_zero=True)
    trainer.callbacks[:] = [before, cb, after]
    state = trainer.fit()
    spe = state.steps_per_epoch
    assert cb.pruned_steps == [spe]  # before the first step of the first fine-tune epoch
    assert before.checked == after.checked == 2 * spe
    assert cb.final_step == spe
    if method == "structured":  # the biases of pruned rows are held at zero too
        params = dict(trainer.model.named_parameters())
        for layer in ("net.1", "net.4"):
            dead = ~cb.masks[f"{layer}.weight"].any(1)
            assert dead.sum() == round(0.6 * len(dead))
            assert torch.count_nonzero(params[f"{layer}.bias"][dead]) == 0


def test_report_rows_measure_dense_before_and_pruned_after(tmp_path):
    """Oneshot at the fit's end: the dense row is the model right before pruning, the pruned row
    right after, both evaluated through `state.measure` at that moment; no fine-tuned row."""
    cfg = _config(tmp_path, {"sparsity": 0.9}, max_epochs=1)
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    (cb,) = trainer.callbacks
    seen: list[float] = []
    measure = trainer.state.measure

    def evaluate(split: str, model: nn.Module | None = None) -> dict[str, float]:
        seen.append(_weight_sparsity(trainer.model, cb._weights))
        return measure(split, model)

    trainer.state.measure = evaluate
    state = trainer.fit()
    assert cb.pruned_steps == [state.max_steps]
    rows = state.compression.rows
    assert [row["stage"] for row in rows] == ["dense", "pruned"]
    pruned = pytest.approx(0.9, abs=1e-4)
    assert seen == [0.0, 0.0, pruned, pruned]  # val, test before; then after
    after = trainer.measure(trainer.val_loader, "val")["val/accuracy"]
    assert rows[1]["val_accuracy"] == after
    assert rows[0]["nonzeros"] > rows[1]["nonzeros"]


def test_pruning_then_quantize_gives_one_row_per_stage(tmp_path):
    """callbacks=[pruning, quantize]: quantize finds pruning's rows and adds its own after them
    (it labels nothing `dense` but the model before pruning)."""
    pytest.importorskip("torchao")
    quantize = {
        "_target_": "trainer.callbacks.quantize.Quantize",
        "mode": "dynamic",
        **FAST_ROWS,
    }
    cfg = _config(tmp_path, {"sparsity": 0.8, "report_dir": str(tmp_path)}, max_epochs=1)
    cfg.callbacks["quantize"] = quantize
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    state = trainer.fit()
    rows = state.compression.rows
    assert [row["stage"] for row in rows] == ["dense", "pruned", "quantized_dynamic"]
    dense, pruned, _ = rows
    assert dense["nonzeros"] == dense["params"] > pruned["nonzeros"]
    table = (tmp_path / "compression_report.md").read_text()
    assert "| pruned |" in table and "| quantized_dynamic |" in table


def test_structured_pruning_then_quantize_quantizes_the_shrunk_model(tmp_path):
    """Before, quantize took the masked model of the dense shapes: as large and as slow as the
    unpruned one. Now it takes the model structured pruning deploys (`state.deploy`)."""
    pytest.importorskip("torchao")
    from trainer.compress.quantize import quantize

    prune_args = {"sparsity": 0.5, "method": "structured", "scope": "layer"}
    cfg = _config(tmp_path, prune_args, max_epochs=1)
    cfg.callbacks["quantize"] = {
        "_target_": "trainer.callbacks.quantize.Quantize",
        "mode": "dynamic",
        **FAST_ROWS,
    }
    trainer, _ = build_trainer(cfg, ENV, tmp_path)
    state = trainer.fit()
    _, quantizer = trainer.callbacks
    dense, pruned, int8 = state.compression.rows
    assert int8["params"] == pruned["params"] < dense["params"]  # the shrunk model's
    shrunk = state.deploy(plain_copy(trainer.model).eval())
    shapes = {k: tuple(v.shape) for k, v in shrunk.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in quantizer.quantized.state_dict().items()} == shapes
    x = torch.randn(16, *trainer.model.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # torchao applied directly to the shrunk model gives the same int8 model
        torch.testing.assert_close(quantizer.quantized(x), quantize(shrunk, "dynamic", [])(x))


def test_interrupted_fit_leaves_pruning_to_the_resumed_run(tmp_path):
    """A stop signal ends the fit early to be resumed: its on_fit_end neither prunes nor
    measures; the resumed run prunes at its own end, as an uninterrupted run does."""
    ckpt = CheckpointConfig(save_final=False)
    kw = {"max_epochs": 1, "checkpoint": ckpt}
    trainer, state = _fit(tmp_path, {"sparsity": 0.5}, [SendSignal("SIGTERM", 3)], **kw)
    (cb, _) = trainer.callbacks
    assert state.interrupted and state.step == 3
    assert cb.pruned_steps == [] and not cb.finished and state.compression is None
    assert not (tmp_path / MODEL_FILE).exists()
    resumed, state = _fit(tmp_path, {"sparsity": 0.5}, resume="auto", **kw)
    (cb,) = resumed.callbacks
    assert cb.pruned_steps == [state.max_steps] and cb.finished
    assert [row["stage"] for row in state.compression.rows] == ["dense", "pruned"]
    assert (tmp_path / MODEL_FILE).is_file()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="scope=layer"):
        Pruning(method="structured")
    with pytest.raises(ValueError, match="latency"):
        Pruning(latency_repeats=2)
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
    assert fresh.state_dict()["final_step"] == cb.state_dict()["final_step"] == cb.final_step


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


# ------------------------------------------------------------------------------- export


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
