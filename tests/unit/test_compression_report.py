"""The compression report (`trainer.compress.report`): each column against a reference computed in
the test (counts from the modules, the file on disk, FlopCounterMode on the float model, the bytes
a known forward allocates), the latency budget and thread count, and the report's files, metrics,
TensorBoard text and checkpointed rows."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.compress.report import (
    JSON_FILE,
    PLOT_FILE,
    TABLE_FILE,
    TENSORBOARD_TAG,
    CompressionReport,
    Timing,
    measure_stage,
    metrics,
)
from trainer.models import CNN, MLP
from trainer.pruning.report import csr_bytes
from trainer.state import TrainState

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed"
)
FAST = Timing(batch_sizes=(1, 8), repeats=3, warmup=1, budget_s=0.05, compiled=False)


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // x.shape[0]


def _state() -> TrainState:
    model = nn.Linear(2, 2)
    return TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, 1)


# ----------------------------------------------------------------------------------- one row


def test_float_row_counts_size_and_flops_match_the_modules_and_the_file(tmp_path):
    torch.manual_seed(0)
    model = MLP(input_shape=(40,), num_classes=10, hidden=(64,)).eval()
    with torch.no_grad():  # 90% of the weights pruned: CSR pays
        for layer in (model.net[1], model.net[4]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.9)
    artifact = tmp_path / "model.pt"
    torch.save(model.state_dict(), artifact)
    inputs = torch.randn(5, 40)
    accuracy = {"test/accuracy": 0.5}
    row = measure_stage("pruned", model, inputs, accuracy=accuracy, artifact=artifact, timing=FAST)

    params = list(model.parameters())
    assert row["test_accuracy"] == 0.5
    assert row["params"] == sum(p.numel() for p in params)
    assert row["nonzeros"] == sum(int((p != 0).sum()) for p in params)
    assert row["size_bytes"] == artifact.stat().st_size
    matrices = [p.detach() for p in params if p.dim() == 2]
    dense = sum(m.numel() * 4 for m in matrices)
    assert row["size_sparse_bytes"] == row["size_bytes"] - dense + sum(map(csr_bytes, matrices))
    assert row["flops_per_sample"] == _flops(model, inputs[:1]) == 2 * (40 * 64 + 64 * 10)
    assert row["flops_counted_on"] == "this model"


def test_without_an_artifact_the_state_dict_file_is_measured_and_dense_has_no_sparse_size():
    torch.manual_seed(0)
    model = CNN(input_shape=(1, 16), num_classes=4, channels=(4,), hidden=8).eval()
    row = measure_stage("dense", model, torch.randn(3, 1, 16), timing=FAST)
    # torch.save's zip archive: every tensor's bytes plus its pickle and alignment overhead
    assert sum(p.numel() * 4 for p in model.parameters()) < row["size_bytes"]
    assert row["size_sparse_bytes"] is None
    assert row["compiled"] == "off" and "latency_compiled_b8_ms" not in row
    assert row["latency_eager_b1_ms"] > 0 and row["latency_eager_b8_ms"] > 0


@needs_torchao
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantized_row_counts_int8_weights_and_takes_the_float_models_flops(tmp_path, mode):
    from trainer.compress.quantize import quantize, save_quantized

    torch.manual_seed(0)
    model = MLP(input_shape=(40,), num_classes=10, hidden=(64,)).eval()
    inputs = torch.randn(16, 40)
    quantized = quantize(model, mode, [inputs])
    path = save_quantized(quantized, mode, tmp_path / "q.pt")
    row = measure_stage("q", quantized, inputs, artifact=path, float_model=model, timing=FAST)

    if mode == "dynamic":  # torchao's Int8Tensor weights: their int8 data
        int8 = [p.qdata for p in quantized.parameters() if hasattr(p, "qdata")]
        floats = [p for p in quantized.parameters() if not hasattr(p, "qdata")]
    else:  # PT2E: int8 weight buffers, float biases; scales and zero points left out
        int8 = [b for b in quantized.buffers() if b.dtype == torch.int8]
        floats = list(quantized.parameters())
    assert len(int8) == 2 and all(t.dtype == torch.int8 for t in int8)
    assert row["params"] == sum(t.numel() for t in int8 + floats)
    assert row["params"] == sum(p.numel() for p in model.parameters())  # one value per weight
    assert row["nonzeros"] == sum(int((t != 0).sum()) for t in int8 + floats)
    assert row["size_bytes"] == path.stat().st_size
    if mode == "dynamic":  # FlopCounterMode does not count torchao's int8 matmuls
        assert _flops(quantized, inputs[:1]) < row["flops_per_sample"]
    assert row["flops_per_sample"] == _flops(model, inputs[:1])
    assert row["flops_counted_on"] == "the float model"
    assert row["model_bytes"] < sum(p.numel() * 4 for p in model.parameters()) / 2


def test_peak_memory_is_the_models_bytes_plus_the_forwards_live_activations():
    torch.manual_seed(0)
    hidden, batch = 128, 8
    one = nn.Sequential(nn.Linear(64, hidden)).eval()
    two = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 32)).eval()
    for model, live in ((one, 1), (two, 2)):  # ReLU's output is made while Linear's is alive
        row = measure_stage("m", model, torch.randn(batch, 64), timing=FAST)
        model_bytes = sum(p.numel() * 4 for p in model.parameters())
        assert row["model_bytes"] == model_bytes
        assert row["peak_memory_eager_bytes"] == model_bytes + live * batch * hidden * 4


class _Sleepy(nn.Module):
    """A forward of `seconds`, recording the intra-op thread count it ran with."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.calls = 0
        self.threads: set[int] = set()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.threads.add(torch.get_num_threads())
        time.sleep(self.seconds)
        return self.head(x)


def test_latency_keeps_to_its_budget_on_one_thread_and_restores_the_thread_count():
    model = _Sleepy(0.01)
    timing = Timing(batch_sizes=(1,), repeats=50, warmup=2, budget_s=0.05, compiled=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        row = measure_stage("slow", model, torch.randn(2, 4), timing=timing)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert model.threads == {1}
    # 2 warm-up calls, then timed calls until the 50 ms budget is spent (about 5 of 10 ms):
    # far fewer than the 50 repeats; FLOPs and peak memory take one call each.
    timed = model.calls - 2 - 2
    assert 3 <= timed <= 8, timed
    assert 10 <= row["latency_eager_b1_ms"] < 50


def test_bad_timing_is_one_clear_error():
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        Timing(batch_sizes=(0,))
    with pytest.raises(ValueError, match="repeats >= 3"):
        Timing(repeats=1)


# ----------------------------------------------------------------------------------- the report


def _rows() -> list[dict]:
    torch.manual_seed(0)
    model = CNN(input_shape=(1, 16), num_classes=4, channels=(4,), hidden=8).eval()
    inputs = torch.randn(4, 1, 16)
    accuracy = {"test/accuracy": 0.75, "test/loss": 0.5}
    dense = measure_stage("dense", model, inputs, accuracy=accuracy, timing=FAST)
    with torch.no_grad():
        model.features[0].weight.mul_(torch.arange(12).reshape(4, 1, 3) % 2)
    pruned = measure_stage("pruned", model, inputs, accuracy=accuracy, timing=FAST)
    return [dense, pruned]


def test_report_logs_each_row_and_writes_json_table_plot_and_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state, (dense, pruned) = _state(), _rows()
    report = CompressionReport.of(state)
    assert CompressionReport.of(state) is report is state.compression  # one per run
    report.add(state, dense)
    report.add(state, pruned)
    for row in (dense, pruned):
        for key in ("test_accuracy", "params", "nonzeros", "size_bytes", "flops_per_sample"):
            assert state.metrics[f"compression/{row['stage']}/{key}"] == row[key]
            assert state.unlogged[f"compression/{row['stage']}/{key}"] == row[key]  # for loggers
    assert "compression/pruned/size_sparse_bytes" not in state.metrics  # 33% zeros: CSR is bigger
    assert metrics(dense) == {k: v for k, v in state.metrics.items() if "/dense/" in k}
    with pytest.raises(ValueError, match="has a 'dense' row already"):
        report.add(state, dense)

    (tmp_path / "tensorboard").mkdir()  # the TensorBoard logger's folder
    written = report.write(tmp_path, step=7)
    saved = json.loads((tmp_path / JSON_FILE).read_text())
    assert [r["stage"] for r in saved["rows"]] == ["dense", "pruned"]
    assert saved["rows"][1] == json.loads(json.dumps(pruned))
    table = (tmp_path / TABLE_FILE).read_text()
    assert table.startswith("| stage | test_accuracy | params | nonzeros | size_bytes |")
    assert f"| pruned | 0.75 | {pruned['params']} | {pruned['nonzeros']} |" in table
    assert (tmp_path / PLOT_FILE).stat().st_size > 0 and written["plot"] == str(
        tmp_path / PLOT_FILE
    )

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    (text,) = events.Tensors(f"{TENSORBOARD_TAG}/text_summary")
    assert text.step == 7
    assert text.tensor_proto.string_val[0].decode() == table


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if absent
    report = CompressionReport(_rows())
    written = report.write(tmp_path, step=0)
    assert written["plot"].startswith("skipped: matplotlib is not installed")
    assert not (tmp_path / PLOT_FILE).exists() and not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / JSON_FILE).read_text())["files"]["plot"] == written["plot"]


def test_rows_are_saved_with_the_state_and_come_back(tmp_path):
    state = _state()
    rows = _rows()
    CompressionReport.of(state).add(state, rows[0])
    path = tmp_path / "state.pt"
    torch.save(state.state_dict(), path)
    fresh = _state()
    assert "compression" not in fresh.state_dict()  # a run that compresses nothing: unchanged
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.compression.rows == [rows[0]]


@needs_torchao
def test_compiled_latency_falls_back_without_freezing_and_says_why():
    """The one compiled measurement of the unit tests (a few seconds): PT2E's Conv1d + pooling
    graph fails under inductor's freezing and runs compiled without it."""
    from trainer.compress.quantize import quantize

    torch.manual_seed(0)
    model = CNN(input_shape=(1, 16), num_classes=4, channels=(4,), hidden=0).eval()
    inputs = torch.randn(8, 1, 16)
    quantized = quantize(model, "static", [inputs])
    timing = Timing(batch_sizes=(4,), repeats=3, warmup=1, budget_s=0.05, compiled=True)
    row = measure_stage("int8", quantized, inputs, float_model=model, timing=timing)
    assert row["compiled"].startswith("without freezing (InductorError: ")
    assert row["latency_compiled_b4_ms"] > 0
    assert row["peak_memory_compiled_bytes"] >= row["model_bytes"]
