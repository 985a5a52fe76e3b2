"""The compression report: one row per stage a run went through (dense, pruned, fine-tuned,
quantized, ...), in the order the run went through them, written as `compression_report.json`,
`compression_report.md` (a table) and `compression_report.png`, and logged as
`compression/<stage>/<metric>` metrics.

What each column is and how `measure_stage` measures it:

- `val_*`, `test_*`: given by the caller from the loop's exact evaluation (`state.measure`), the
  same sums across ranks that `val/...` and `test/...` are.
- `params`, `nonzeros`: the values the model stores for its weights: its parameters, torchao's
  int8 weights counted by their int8 data, and a PT2E graph's int8 weight buffers (quantization
  scales and zero points, and batch-norm statistics, are not counted).
- `size_bytes`: the exported artifact's size on disk (a stage without an artifact of its own: its
  state dict written by `torch.save` to a temporary file). `size_sparse_bytes`, where the weights
  are sparse enough for it to be smaller: the same file with each >= 2-D weight stored as CSR
  (`trainer.pruning.report`'s byte counter). `size_compressed_bytes`: that file compressed with
  xz (`xz_compressed`), the size a pruned model ships at. An int8 model stores its zeros densely,
  one byte each, and CSR's 4-byte indices cost more than the int8 values they save, so for a
  pruned int8 model `size_sparse_bytes` is no smaller; the compressed file is, and it is a file
  a user ships and loads as it is (`load_quantized` reads `quantized_model.pt.xz`).
- `flops_per_sample`: `FlopCounterMode` on one forward. It counts 0 for int8 kernels, so a
  quantized row counts its float model's FLOPs, which the int8 model's structure keeps
  (`flops_counted_on` says which model was counted).
- `latency_<eager|compiled>_b<N>_ms`: the median wall time of a forward of N real samples on one
  thread (`torch.set_num_threads(1)`, restored after), warm-up calls excluded, over at most
  `repeats` calls and at least 3, fewer once the stage's share of `budget_s` is spent (compiling
  is not counted in the budget). Compiled: `torch.compile(dynamic=False)` with inductor's
  freezing (weights become constants, which PT2E's int8 kernels need), where that fails again
  without it (inductor fails on PT2E Conv1d + pooling graphs with freezing), and `compiled`
  says which; a compile that fails altogether is recorded there and its columns stay empty.
- `peak_memory_<eager|compiled>_bytes`: the model's own tensor bytes plus the peak of what one
  forward of the largest batch allocates through torch's CPU allocator, from torch.profiler's
  memory events (every allocation and free in time order; compiled kernels' buffers go through
  the same allocator). tracemalloc does not see torch's allocator, and the process's RSS moves
  with the allocator's caching and every other thread, so neither measures one forward. Memory a
  kernel library keeps for itself (oneDNN's scratchpads) is not seen.
"""

from __future__ import annotations

import io
import json
import lzma
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from trainer.compress.lowrank import flops_per_sample
from trainer.pruning.report import csr_bytes

if TYPE_CHECKING:
    from trainer.state import TrainState

JSON_FILE = "compression_report.json"
TABLE_FILE = "compression_report.md"
PLOT_FILE = "compression_report.png"
TENSORBOARD_TAG = "compression_report"
MIN_REPEATS = 3
# The table's leading columns; the rest follow in the order the rows hold them.
_FIRST_COLUMNS = ("test_accuracy", "val_accuracy", "params", "nonzeros", "size_bytes")


@dataclass(frozen=True)
class Timing:
    """How latency is measured: batch sizes, calls per measurement, the time budget in seconds of
    one stage's timed calls (split evenly over its measurements), and whether to compile."""

    batch_sizes: Sequence[int] = (1, 256)
    repeats: int = 30
    warmup: int = 2
    budget_s: float = 20.0
    compiled: bool = True

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"latency batch sizes must be >= 1, got {list(self.batch_sizes)}")
        if self.repeats < MIN_REPEATS or self.warmup < 1 or self.budget_s <= 0:
            raise ValueError(
                f"latency needs repeats >= {MIN_REPEATS}, warmup >= 1 and budget_s > 0, got "
                f"{self.repeats}, {self.warmup}, {self.budget_s}"
            )

    @classmethod
    def of_options(
        cls,
        owner: str,
        batch_sizes: Sequence[int],
        repeats: int,
        budget_s: float,
        compiled: bool,
    ) -> Timing:
        """A callback's latency options; a bad one is a ValueError naming `<owner>.latency`."""
        try:
            return cls(tuple(batch_sizes), repeats=repeats, budget_s=budget_s, compiled=compiled)
        except ValueError as err:
            raise ValueError(f"{owner}.latency: {err}") from None


# ----------------------------------------------------------------------------------- counting


def stored_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The values the model stores for its weights, as plain tensors (see the module docstring)."""
    out = {name: getattr(p, "qdata", p).detach() for name, p in model.named_parameters()}
    for name, buffer in model.named_buffers():
        if buffer.dtype == torch.int8:  # PT2E keeps its int8 weights as buffers
            out[name] = buffer
    return out


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's Int8Tensor) by its inner tensors."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def _model_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in model.state_dict().values())


def xz_compressed(data: bytes) -> bytes:
    """`data` in the xz format (LZMA, preset 6: `xz` on the command line, `lzma.open` in
    Python), as `size_compressed_bytes` counts it and a compressed artifact is written."""
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=6)


def _sizes(model: nn.Module, artifact: Path | None) -> dict[str, int | None]:
    """Size on disk of `artifact` (None: the model's state dict saved to a temporary file), the
    same with each >= 2-D weight stored as CSR where that is smaller, and the file's bytes
    compressed with xz."""
    if artifact is None:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)  # the bytes torch.save writes to a file
        data = buffer.getvalue()
    else:
        data = Path(artifact).read_bytes()
    size = len(data)
    matrices = [w for w in stored_weights(model).values() if w.dim() >= 2]
    sparse = size - sum(tensor_bytes(w) for w in matrices) + sum(map(csr_bytes, matrices))
    return {
        "size_bytes": size,
        "size_sparse_bytes": sparse if sparse < size else None,
        "size_compressed_bytes": len(xz_compressed(data)),
    }


# ----------------------------------------------------------------------------------- timing


def _batch(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """`size` samples of `inputs`, repeated when there are fewer."""
    reps = math.ceil(size / inputs.shape[0])
    return inputs.repeat(reps, *[1] * (inputs.dim() - 1))[:size].contiguous()


def _median_ms(run: Callable[[], Any], timing: Timing, budget_s: float) -> float:
    for _ in range(timing.warmup):
        run()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < timing.repeats and (
        len(times) < MIN_REPEATS or time.perf_counter() < deadline
    ):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)


def _forward_peak_bytes(run: Callable[[], Any]) -> int:
    """The peak of the bytes allocated (net of frees) through torch's CPU allocator during one
    call, from torch.profiler's memory events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@torch.no_grad()
def _time_mode(
    mode: str, forward: Callable, inputs: torch.Tensor, timing: Timing, budget_s: float
) -> dict[str, float]:
    out: dict[str, float] = {}
    for size in timing.batch_sizes:
        x = _batch(inputs, size)
        out[f"latency_{mode}_b{size}_ms"] = _median_ms(lambda x=x: forward(x), timing, budget_s)
    largest = _batch(inputs, max(timing.batch_sizes))
    out[f"peak_memory_{mode}_bytes"] = _forward_peak_bytes(lambda: forward(largest))
    return out


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _compiled(model: nn.Module, inputs: torch.Tensor, timing: Timing, budget_s: float) -> dict:
    """Compiled latency and memory, with freezing, else without; `compiled` says how it went."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    why = ""
    for freezing in (True, False):
        # A recompile limit reached would silently run eager code: make it an error instead.
        settings = inductor_config.patch(freezing=freezing)
        try:
            with settings, dynamo_config.patch(fail_on_recompile_limit_hit=True):
                compiled = torch.compile(model, dynamic=False)
                out: dict[str, Any] = _time_mode("compiled", compiled, inputs, timing, budget_s)
        except Exception as err:  # inductor's errors vary; each is recorded, none is fatal
            why = f"{type(err).__name__}: {_first_line(err)}"
            continue
        out["compiled"] = "with freezing" if freezing else f"without freezing ({why})"
        return out
    return {"compiled": f"failed ({why})"}


# ----------------------------------------------------------------------------------- one stage


def measure_stage(
    stage: str,
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    accuracy: Mapping[str, float] | None = None,
    artifact: str | os.PathLike | None = None,
    float_model: nn.Module | None = None,
    timing: Timing = Timing(),
    note: str = "",
) -> dict[str, Any]:
    """One row of the report for `model` (a plain CPU model in eval mode, as deployed).

    `inputs`: real samples (at least one) the latency batches are cut from. `accuracy`: the
    loop's metrics for it ({"val/accuracy": ...}). `artifact`: its exported file (None: its
    state dict is saved to a temporary file to be measured). `float_model`: where FLOPs are
    counted when `model` runs int8 kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = stored_weights(model)
        counted = model if float_model is None else float_model
        row: dict[str, Any] = {
            "stage": stage,
            **{key.replace("/", "_"): value for key, value in (accuracy or {}).items()},
            "params": sum(w.numel() for w in weights.values()),
            "nonzeros": sum(int(torch.count_nonzero(w)) for w in weights.values()),
            **_sizes(model, None if artifact is None else Path(artifact)),
            "flops_per_sample": flops_per_sample(counted, inputs[:1]),
            "flops_counted_on": "this model" if float_model is None else "the float model",
            "model_bytes": _model_bytes(model),
        }
        measurements = len(timing.batch_sizes) * (2 if timing.compiled else 1)
        budget = timing.budget_s / measurements
        row.update(_time_mode("eager", model, inputs, timing, budget))
        row["compiled"] = "off"
        if timing.compiled:
            row.update(_compiled(model, inputs, timing, budget))
        for key in [k for k in row if k.startswith("peak_memory_")]:
            row[key] += row["model_bytes"]
    finally:
        torch.set_num_threads(threads)
    row["note"] = note
    return row


def metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A row's numbers as `compression/<stage>/<metric>`."""
    return {
        f"compression/{row['stage']}/{key}": float(value)
        for key, value in row.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


# ----------------------------------------------------------------------------------- the report


class CompressionReport:
    """A run's report: its rows in the order stages were added. `TrainState` holds one (created by
    the first stage, `CompressionReport.of(state)`), so every compression callback adds its row
    to the same report; the rows are saved in checkpoints with the state."""

    def __init__(self, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        self.rows = [dict(row) for row in rows]

    @staticmethod
    def of(state: TrainState) -> CompressionReport:
        if state.compression is None:
            state.compression = CompressionReport()
        return state.compression

    def row(self, stage: str) -> dict[str, Any] | None:
        return next((row for row in self.rows if row["stage"] == stage), None)

    def add(self, state: TrainState, row: Mapping[str, Any]) -> None:
        """Append a stage's row (the same on every rank) and log its numbers."""
        if self.row(row["stage"]) is not None:
            raise ValueError(f"the compression report has a {row['stage']!r} row already")
        self.rows.append(dict(row))
        state.log(metrics(row))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows]}

    # ------------------------------------------------------------------------------ output
    def markdown(self) -> str:
        """The rows as a markdown table, one column per measured value (empty where a row has
        none), then each row's notes."""
        present = dict.fromkeys(k for row in self.rows for k in row)
        first = [k for k in _FIRST_COLUMNS if k in present]
        skip = {"stage", "note", "compiled", "flops_counted_on", *first}
        columns = first + [k for k in present if k not in skip]
        lines = [
            "| stage | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for row in self.rows:
            cells = [_cell(row.get(key)) for key in columns]
            lines.append(f"| {row['stage']} | " + " | ".join(cells) + " |")
        lines.append("")
        for row in self.rows:
            notes = [row.get("note"), f"FLOPs counted on {row.get('flops_counted_on')}"]
            notes.append(f"compiled: {row.get('compiled')}")
            lines.append(f"- {row['stage']}: " + "; ".join(n for n in notes if n))
        return "\n".join(lines) + "\n"

    def write(self, folder: str | os.PathLike, step: int) -> dict[str, str]:
        """Write the JSON, the table and the plot into `folder` (rank 0 calls it), and the table as
        text into the TensorBoard logger's folder there when it exists; returns what was
        written, or why the plot was not."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = {"table": str(_write(folder / TABLE_FILE, self.markdown()))}
        written["plot"] = self._plot(folder / PLOT_FILE)
        if (folder / "tensorboard").is_dir():
            self._tensorboard(folder / "tensorboard", step)
            written["tensorboard"] = f"text {TENSORBOARD_TAG!r} at step {step}"
        data = {"rows": self.rows, "files": written}
        written["json"] = str(_write(folder / JSON_FILE, json.dumps(data, indent=2) + "\n"))
        return written

    def _tensorboard(self, folder: Path, step: int) -> None:
        # An event file of its own beside the logger's: TensorBoard reads every file of the
        # folder, and the loggers take numbers only.
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(folder), filename_suffix=".compression")
        try:
            writer.add_text(TENSORBOARD_TAG, self.markdown(), global_step=step)
        finally:
            writer.close()

    def _plot(self, path: Path) -> str:
        """Test accuracy against artifact size and against latency at the largest batch
        (compiled where it compiled, else eager), one colour per stage. matplotlib is optional:
        without it, say so."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return "skipped: matplotlib is not installed (pip install matplotlib)"
        rows = [row for row in self.rows if "test_accuracy" in row]
        if not rows:
            return "skipped: no row has a test accuracy"
        figure = Figure(figsize=(10, 4), layout="constrained")
        size_axes, latency_axes = figure.subplots(1, 2, sharey=True)
        for colour, row in enumerate(rows):
            style = {"color": f"C{colour % 10}", "label": row["stage"]}
            accuracy = 100 * row["test_accuracy"]
            size_axes.scatter(row["size_bytes"] / 1e3, accuracy, **style)
            latency = _largest_batch_latency(row)
            if latency is not None:
                latency_axes.scatter(latency, accuracy, **style)
        size_axes.set(xlabel="artifact size on disk (kB)", ylabel="test accuracy (%)")
        batch = max((int(m[2]) for r in rows for k in r if (m := _LATENCY.fullmatch(k))), default=0)
        latency_axes.set(xlabel=f"CPU latency at batch {batch}, 1 thread (ms)")
        size_axes.legend(fontsize="small")
        figure.savefig(path, dpi=120)
        return str(path)


_LATENCY = re.compile(r"latency_(eager|compiled)_b(\d+)_ms")


def _largest_batch_latency(row: Mapping[str, Any]) -> float | None:
    """The row's latency at its largest batch, compiled where measured, else eager."""
    for mode in ("compiled", "eager"):
        batches = {int(m[2]): k for k in row if (m := _LATENCY.fullmatch(k)) and m[1] == mode}
        if batches:
            return row[batches[max(batches)]]
    return None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write(path: Path, text: str) -> Path:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.replace(path)
    return path
