"""Shared pieces of the benchmarks: the workloads, hooktrain's config for them, the plain PyTorch
loop that does the same work, interleaved timing, and the markdown table.

`python -m benchmarks.common SPEC_JSON REPORT` is the plain loop's own fresh process (peak memory,
time to first step), so this module imports only torch and the model and data modules at the top;
Hydra and the trainer's builder are imported inside the functions that need them.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from trainer.callbacks.base import Callback
from trainer.distributed.env import several_ranks

REPO = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (1, 32, 32)  # synthetic data, 10 classes: an MNIST-sized image for every model
# Batch size per process for each model recipe: one training step takes ~10-30 ms on one core.
BATCH = {"mlp": 256, "cnn": 32, "gru": 64, "transformer": 32}
# wandb offline and quiet; rich draws the progress bar as on a terminal even when stderr is a file
# (otherwise it would skip the drawing and the benchmark would not pay for it).
BENCH_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TTY_COMPATIBLE": "1"}


# ------------------------------------------------------------------------------ hooktrain
def cli_overrides(model: str, steps: int, batch: int | None = None) -> list[str]:
    """`hooktrain` overrides for the benchmark workload: the default job (WarmupCosine, the progress
    bar, TensorBoard + jsonl, AdamW, grad_clip 1.0) without validation, test or checkpoint."""
    shape = ",".join(map(str, INPUT_SHAPE))
    return [
        f"model={model}",
        "data=synthetic",
        f"data.dataset.input_shape=[{shape}]",
        f"data.batch_size={batch or BATCH[model]}",
        "device=cpu",
        f"max_steps={steps}",
        "val_every_epochs=0",
        "test_after_fit=false",
        "checkpoint.save_final=false",
    ]


def hooktrain_config(model: str, steps: int, *overrides: str, batch: int | None = None) -> Any:
    """The `TrainConfig` that `hooktrain <cli_overrides> <overrides>` would run."""
    from hydra import compose, initialize_config_dir

    from trainer.cli import recipes_dir  # also registers the schema and the resolvers
    from trainer.config import validate

    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*cli_overrides(model, steps, batch), *overrides])
    return validate(cfg)


def add_override_argument(parser: Any) -> None:
    """`--override KEY=VALUE` (repeatable): hooktrain config overrides for every workload."""
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hooktrain config override for every workload (repeatable); "
        "data.batched_fetch=false: both loops fetch sample by sample, so the ratio is the loop's "
        "own cost",
    )


def described(overrides: Sequence[str]) -> str:
    """The overrides, for a benchmark's header line."""
    return f"; hooktrain overrides: {' '.join(overrides)}" if overrides else ""


# ------------------------------------------------------------------------------ plain PyTorch
def plain_spec(cfg: Any) -> dict[str, Any]:
    """What the plain loop needs from a hooktrain config to do the same work (JSON-able)."""
    assert cfg.grad_accum_steps == 1 and cfg.precision == "fp32" and not cfg.compile
    return {
        "dataset": cfg.data.dataset,
        "model": cfg.model,
        "optim": cfg.optim,
        "batch_size": cfg.data.batch_size,
        "batched_fetch": cfg.data.batched_fetch,  # every benchmark dataset is a TensorDataset
        "num_workers": cfg.data.num_workers,
        "seed": cfg.seed,
        "grad_clip": cfg.grad_clip,
        "steps": cfg.max_steps,
    }


def _construct(node: dict[str, Any], **extra: Any) -> Any:
    """`node["_target_"](**node, **extra)`, without Hydra."""
    module, _, name = node["_target_"].rpartition(".")
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    return getattr(importlib.import_module(module), name)(**kwargs, **extra)


class PlainLoop:
    """A hand-written loop doing hooktrain's work: the same data, model, AdamW, cross-entropy and
    gradient clipping, `zero_grad(set_to_none=True)`, batches drawn by a `DistributedSampler`
    (num_replicas=1, rank=0 in one process, as hooktrain does) reshuffled each epoch. With `ddp`:
    `DistributedDataParallel` and the data sharded over the default process group. With
    `spec["batched_fetch"]` (as hooktrain's `data.batched_fetch`) its `DataLoader` fetches whole
    batches through a `BatchSampler`, as hooktrain does; without, sample by sample.

    With `share` (a hooktrain `Trainer`, or another `PlainLoop`), the loop trains that one's very
    model (DDP-wrapped as it is), optimizer and training set instead of building its own, so
    that the two loops differ in nothing but the loop: not even in where their tensors live."""

    def __init__(self, spec: dict[str, Any], ddp: bool = False, share: Any = None) -> None:
        torch.manual_seed(spec["seed"])
        if share is None:
            splits = _construct(spec["dataset"])
            model = _construct(
                spec["model"], input_shape=splits.input_shape, num_classes=splits.num_classes
            )
            self.model = DistributedDataParallel(model) if ddp else model
            self.optimizer = _construct(spec["optim"], params=self.model.parameters())
            train = splits.train
        else:
            self.model, self.optimizer = share.model, share.optimizer
            train = share.train_loader.dataset
        self.sampler = DistributedSampler(
            train,
            num_replicas=dist.get_world_size() if ddp else 1,
            rank=dist.get_rank() if ddp else 0,
            shuffle=True,
            seed=spec["seed"],
            drop_last=True,
        )
        if spec["batched_fetch"]:
            batches = BatchSampler(self.sampler, spec["batch_size"], drop_last=True)
            self.train_loader = DataLoader(
                train, batch_size=None, sampler=batches, num_workers=spec["num_workers"]
            )
        else:
            self.train_loader = DataLoader(
                train,
                batch_size=spec["batch_size"],
                sampler=self.sampler,
                drop_last=True,
                num_workers=spec["num_workers"],
            )
        self.grad_clip = spec["grad_clip"]
        self.batches = self._epochs()
        self.model.train()

    def _epochs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.train_loader
            epoch += 1

    def step(self) -> None:
        inputs, targets = next(self.batches)
        loss = F.cross_entropy(self.model(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()


class PlainAsTrainer:
    """A second plain loop dressed as a trainer for `interleave` (`fit()` up to
    `state.max_steps`, `callbacks` told of each step's end): an A/A comparison of two identical
    loops, which shows how far the measurement alone strays from 1.0x."""

    def __init__(self, plain: PlainLoop) -> None:
        self.plain = plain
        self.callbacks: list[Callback] = []
        self.state = types.SimpleNamespace(step=0, max_steps=0)

    def fit(self) -> None:
        while self.state.step < self.state.max_steps:
            self.plain.step()
            self.state.step += 1
            for callback in self.callbacks:
                callback.on_step_end(self.state)


# ------------------------------------------------------------------------------ measuring
class FirstStepProbe(Callback):
    """What a fresh process measures, written to `report` (a path) at fit end: the wall-clock time
    the first step ended, the RSS just before the first step, and the peak RSS. hooktrain calls it
    as its last callback, the plain loop's own process by hand."""

    def __init__(self, report: str) -> None:
        self.report = report
        self.first_step_wall: float | None = None
        self.rss_before_first_step_mib: float | None = None

    def on_step_start(self, state: Any = None) -> None:
        if self.rss_before_first_step_mib is None:
            self.rss_before_first_step_mib = rss_mib()

    def on_step_end(self, state: Any = None) -> None:
        if self.first_step_wall is None:
            self.first_step_wall = time.time()

    def on_fit_end(self, state: Any = None) -> None:
        facts = {
            "first_step_wall": self.first_step_wall,
            "rss_before_first_step_mib": self.rss_before_first_step_mib,
            "peak_rss_mib": peak_rss_mib(),
        }
        Path(self.report).write_text(json.dumps(facts))


class AlternatingPlainStep(Callback):
    """Appended last to hooktrain's callbacks: at the end of each hooktrain step it notes the time,
    runs one step of the plain loop, and notes the time again. The two loops thus alternate step
    by step, and each pair of steps meets the machine in the same state."""

    def __init__(self, plain: PlainLoop) -> None:
        self.plain = plain
        self.hooktrain_ends: list[float] = []  # time.perf_counter() at the end of each step
        self.plain_ends: list[float] = []

    def on_step_end(self, state: Any = None) -> None:
        self.hooktrain_ends.append(time.perf_counter())
        self.plain.step()
        self.plain_ends.append(time.perf_counter())


def interleave(
    plain: PlainLoop, trainer: Any, rounds: int, steps: int, batch: int
) -> dict[str, Any]:
    """Run hooktrain and the plain loop step by step in turns (`AlternatingPlainStep`): one
    warm-up segment of `steps` steps of each, then `rounds` timed segments.

    A segment is one `fit()` call on the trainer, whose `state.max_steps` is raised by `steps`
    each time: like a resumed run, each starts and stops the callbacks (the progress bar), the
    data order runs on, the loggers stay open. A hooktrain step lasts from the end of the plain
    step before it to its own end (a whole loop iteration: what follows `on_step_end`, such as
    the hand-off to the loggers, the data, the hooks, `train_step`); a plain step from the end of
    the hooktrain step before it to its own end. `batch` is the global batch.

    Returns, per loop, each segment's samples/s under "plain" / "hooktrain", and each segment's
    step durations (s; the 2nd step to the last) under "plain_steps" / "hooktrain_steps", for
    `per_position_ratio`."""
    turns = AlternatingPlainStep(plain)
    trainer.callbacks.append(turns)
    trainer.state.max_steps = trainer.state.step
    results: dict[str, Any] = {
        "plain": [],
        "hooktrain": [],
        "plain_steps": [],
        "hooktrain_steps": [],
    }
    for round_ in range(rounds + 1):
        turns.hooktrain_ends.clear()
        turns.plain_ends.clear()
        trainer.state.max_steps += steps
        trainer.fit()
        if round_ == 0:
            continue  # warm-up
        ends = {"hooktrain": turns.hooktrain_ends, "plain": turns.plain_ends}
        starts = {"hooktrain": turns.plain_ends[:-1], "plain": turns.hooktrain_ends[1:]}
        for name in ("plain", "hooktrain"):
            pairs = zip(starts[name], ends[name][1:], strict=True)
            durations = [end - start for start, end in pairs]
            results[f"{name}_steps"].append(durations)
            results[name].append(len(durations) * batch / sum(durations))
    trainer.callbacks.remove(turns)
    return results


def interleaved_blocks(
    cfg: Any,
    env: Any,
    blocks: int,
    rounds: int,
    steps: int,
    share: bool = True,
    plain_per_sample: bool = False,
) -> list[dict]:
    """`interleave` `blocks` times, each time with a hooktrain trainer and a plain loop built
    afresh (DDP-wrapped when `env` spans several processes); returns each block's results.

    With `share`, the plain loop trains the trainer's own model, optimizer and training set
    (`PlainLoop(share=trainer)`): the ratio is then the loop's cost alone. Without it, each loop
    builds its own, and the ratio also carries where each build's tensors happened to land in
    memory, which on this machine moves one block's ratio by up to ±20% (`--identical`).
    `plain_per_sample`: the plain loop fetches sample by sample whatever hooktrain does."""
    from trainer.build import build_trainer

    results = []
    for _ in range(blocks):
        with tempfile.TemporaryDirectory() as run_dir:  # rank 0 writes the logs here
            trainer, _ = build_trainer(cfg, env, Path(run_dir))
            spec = plain_spec(cfg)
            if plain_per_sample:
                spec["batched_fetch"] = False
            plain = PlainLoop(spec, ddp=env.is_distributed, share=trainer if share else None)
            gc.collect()
            batch = cfg.data.batch_size * env.world_size
            results.append(interleave(plain, trainer, rounds, steps, batch))
            trainer.logger.finish()
    return results


def identical_blocks(cfg: Any, blocks: int, rounds: int, steps: int, share: bool = True) -> list:
    """`interleaved_blocks` with the plain loop on both sides (A/A): the second one, dressed as a
    trainer (`PlainAsTrainer`), trains the first one's model (with `share`). Run inside the
    process group when there is one: both loops are then DDP-wrapped, as in `bench_ddp`."""
    ddp = several_ranks()
    results = []
    for _ in range(blocks):
        plain = PlainLoop(plain_spec(cfg), ddp=ddp)
        twin = PlainAsTrainer(PlainLoop(plain_spec(cfg), ddp=ddp, share=plain if share else None))
        gc.collect()
        batch = cfg.data.batch_size * (dist.get_world_size() if ddp else 1)
        results.append(interleave(plain, twin, rounds, steps, batch))
    return results


def identical_table(results: dict[str, list[dict]], cycle: int) -> str:
    """The A/A table: for each model, each block's ratio, then `comparison`'s ratio cells."""
    rows = [
        [
            model,
            " ".join(f"{per_position_ratio(block, cycle):.3f}" for block in blocks),
            *comparison(blocks, cycle)[2:],
        ]
        for model, blocks in results.items()
    ]
    headers = ["model", "per block", "plain B/plain A", "range over blocks", "median of rounds"]
    return markdown_table(headers, rows)


def per_position_ratio(results: dict[str, Any], cycle: int) -> float:
    """hooktrain/plain throughput from the median duration of each step position in the logging
    cycle (step k of the segment, k mod `cycle`; segments are whole cycles long).

    On a shared VM step times have a long tail of stalls, which dominate means and per-segment
    figures. The median of each position is robust to them and still charges the loop's work of
    once a cycle (log steps are one position in `cycle`) to hooktrain; the cycle's time is the
    sum of those medians."""

    def cycle_seconds(segments: list[list[float]]) -> float:
        by_position: dict[int, list[float]] = {}
        for durations in segments:
            for step, seconds in enumerate(durations, start=2):  # the 2nd step of the segment on
                by_position.setdefault(step % cycle, []).append(seconds)
        return sum(median(v) for v in by_position.values())

    return cycle_seconds(results["plain_steps"]) / cycle_seconds(results["hooktrain_steps"])


COMPARISON = [
    "plain samples/s",
    "hooktrain samples/s",
    "hooktrain/plain",
    "range over blocks",
    "median of round ratios",
]


def pooled(blocks: list[dict[str, Any]], loop: str) -> list[float]:
    """Every segment's samples/s of `loop` ("plain" or "hooktrain") over all blocks."""
    return [sps for block in blocks for sps in block[loop]]


def comparison(blocks: list[dict[str, Any]], cycle: int) -> list[str]:
    """Table cells (COMPARISON) from `interleave` results of several blocks, each with freshly
    built loops: median samples/s of each loop over all segments; the headline, the median over
    blocks of `per_position_ratio`, and its range; the median of all per-round ratios.

    A fresh trainer per block because one build carries a bias of its own (where its tensors
    land in memory), which the median over blocks averages out; with `--separate-builds`, where
    each loop has its own, `bench_loop --identical` shows that bias at up to ±20% a block."""
    ratios = [per_position_ratio(block, cycle) for block in blocks]
    rounds = [
        h / p for block in blocks for p, h in zip(block["plain"], block["hooktrain"], strict=True)
    ]
    return [
        f"{median(pooled(blocks, 'plain')):.0f}",
        f"{median(pooled(blocks, 'hooktrain')):.0f}",
        f"**{median(ratios):.3f}x**",
        f"{min(ratios):.2f}-{max(ratios):.2f}",
        f"{median(rounds):.3f}x",
    ]


def build_each_dataset_once() -> None:
    """Benchmarks that fit many runs on one generated dataset (MNIST-1D takes seconds to make)
    build it once: `trainer.build.build_data` is wrapped in a cache keyed by the dataset node."""
    import trainer.build as build_module

    build = build_module.build_data
    if getattr(build, "cache", None) is not None:
        return
    cache: dict[str, Any] = {}

    def cached(cfg: Any) -> Any:
        key = json.dumps(cfg.data.dataset, sort_keys=True)
        if key not in cache:
            cache[key] = build(cfg)
        return cache[key]

    cached.cache = cache  # type: ignore[attr-defined]
    build_module.build_data = cached


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    # Not getrusage's ru_maxrss: a child started by fork + exec inherits its parent's high-water
    # mark there (an empty child of a 500 MiB parent reports 500 MiB); VmHWM starts afresh.
    return _status_mib("VmHWM")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_for_quiet(below: float, timeout: float = 600, every: float = 30) -> None:
    """Wait until the 1-minute load average is below `below`, checking every `every` s, for at
    most `timeout` s (then go on, and the printed load says under what it was measured)."""
    deadline = time.monotonic() + timeout
    while os.getloadavg()[0] >= below and time.monotonic() < deadline:
        print(f"load average {load_average()}: waiting for < {below}", file=sys.stderr)
        time.sleep(every)


def machine() -> str:
    """The machine, torch, the hooktrain commit measured, and the load."""
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    git = ["git", "--no-optional-locks", "-C", str(REPO)]  # read-only: never touches the index
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "trainer", "recipes"]).returncode
    return (
        f"{os.cpu_count()} CPU cores ({names[0] if names else platform.machine()}), "
        f"torch {torch.__version__}, Python {platform.python_version()}, hooktrain "
        f"{commit.stdout.strip() or '?'}{' + uncommitted changes' if dirty else ''}, "
        f"load average {load_average()} (1, 5, 15 min)"
    )


if __name__ == "__main__":
    # The plain loop in its own process: python -m benchmarks.common SPEC_JSON REPORT_PATH
    spec, probe = json.loads(sys.argv[1]), FirstStepProbe(report=sys.argv[2])
    loop = PlainLoop(spec)
    for _ in range(spec["steps"]):
        probe.on_step_start()
        loop.step()
        probe.on_step_end()
    probe.on_fit_end()
