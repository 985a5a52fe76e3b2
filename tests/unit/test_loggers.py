"""Loggers and the progress bar: real TensorBoard and jsonl files read back, real rich output.

`LoggerGroup` writes from a background thread, so these tests also pin down what `flush()` and
`finish()` promise: everything sent before them is written, in order.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import ENV, make_config, make_trainer  # noqa: E402
from trainer.build import build_loggers  # noqa: E402
from trainer.callbacks.base import Callback  # noqa: E402
from trainer.callbacks.progress import ProgressBar  # noqa: E402
from trainer.loggers.base import Logger, LoggerGroup  # noqa: E402
from trainer.loggers.jsonl import JsonlLogger  # noqa: E402
from trainer.loggers.tensorboard import TensorBoardLogger  # noqa: E402
from trainer.state import TrainState  # noqa: E402

JSONL = {"_target_": "trainer.loggers.jsonl.JsonlLogger"}
TENSORBOARD = {"_target_": "trainer.loggers.tensorboard.TensorBoardLogger"}


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Failing(Logger):
    def __init__(self) -> None:
        self.calls = 0

    def log_metrics(self, metrics: Any, step: int) -> None:
        self.calls += 1
        raise OSError("the logging service is down")


def test_flush_makes_every_metric_sent_so_far_visible_in_order(tmp_path):
    group = LoggerGroup({"jsonl": lambda: JsonlLogger(str(tmp_path))})
    for step in range(1, 201):
        group.log_metrics({"train/loss": 1.0 / step}, step)
    group.flush()
    assert [row["step"] for row in rows(tmp_path / "metrics.jsonl")] == list(range(1, 201))
    group.finish()


def test_metrics_are_handed_to_the_thread_in_batches_at_most_every_send_every_s(tmp_path):
    group = LoggerGroup({"jsonl": lambda: JsonlLogger(str(tmp_path))}, send_every_s=3600)
    for step in (1, 2, 3):
        group.log_metrics({"x": float(step)}, step)
    group._writer.submit(lambda: None).result()  # whatever was handed over is written now
    assert rows(tmp_path / "metrics.jsonl") == []  # held: less than an hour since the start
    group.flush()
    assert [row["step"] for row in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    group.send_every_s = 0  # now every call hands its row over at once
    group.log_metrics({"x": 4.0}, 4)
    group._writer.submit(lambda: None).result()
    assert rows(tmp_path / "metrics.jsonl")[-1] == {"step": 4, "x": 4.0}
    group.finish()


def test_the_caller_may_reuse_its_dict_after_sending_it(tmp_path):
    group = LoggerGroup({"jsonl": lambda: JsonlLogger(str(tmp_path))})
    metrics = {"lr": 0.1}
    group.log_metrics(metrics, 1)
    metrics.clear()  # the loop clears state.unlogged right after each flush
    metrics["lr"] = 0.2
    group.log_metrics(metrics, 2)
    group.finish()
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 1, "lr": 0.1}, {"step": 2, "lr": 0.2}]


def test_flush_writes_tensorboard_events_to_disk(tmp_path):
    # TensorBoard's writer keeps events in a queue that its own thread writes out: a flush (as
    # before a checkpoint) returns once they are in the file.
    group = LoggerGroup({"tb": lambda: TensorBoardLogger(str(tmp_path), flush_secs=3600)})
    for step in range(1, 201):
        group.log_metrics({"train/loss": 1.0 / step}, step)
    group.flush()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 201))
    group.finish()


def test_rewind_drops_what_an_earlier_attempt_logged_after_the_step(tmp_path):
    """A killed attempt logged steps 1-6 (the last row half written); its restart goes on from
    the checkpoint of step 4 and logs 5-7 again: each step is in the logs once."""
    first = LoggerGroup(
        {
            "jsonl": lambda: JsonlLogger(str(tmp_path)),
            "tb": lambda: TensorBoardLogger(str(tmp_path)),
        }
    )
    for step in range(1, 7):
        first.log_metrics({"train/loss": float(step)}, step)
    first.finish()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # killed while writing
    second = LoggerGroup(
        {
            "jsonl": lambda: JsonlLogger(str(tmp_path)),
            "tb": lambda: TensorBoardLogger(str(tmp_path)),
        }
    )
    second.rewind(4)
    for step in range(5, 8):
        second.log_metrics({"train/loss": 10.0 * step}, step)
    second.finish()
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    assert [(r["step"], r["train/loss"]) for r in rows(tmp_path / "metrics.jsonl")] == want
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted((e.step, e.value) for e in events.Scalars("train/loss")) == want


def test_a_failing_logger_warns_once_and_the_others_go_on(tmp_path):
    failing = Failing()
    group = LoggerGroup({"failing": lambda: failing, "jsonl": lambda: JsonlLogger(str(tmp_path))})
    with pytest.warns(RuntimeWarning, match=r"logger Failing failed in log_metrics .*OSError"):
        for step in (1, 2, 3):
            group.log_metrics({"x": float(step)}, step)
        group.flush()
    assert failing.calls == 1  # switched off after its first failure
    group.finish()
    assert [row["x"] for row in rows(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 3.0]


def test_a_real_logger_that_cannot_start_is_left_out_with_a_warning(tmp_path):
    (tmp_path / "tensorboard").write_text("a file where TensorBoard wants its folder")
    cfg = make_config(logger={"tensorboard": TENSORBOARD, "jsonl": JSONL})
    with pytest.warns(RuntimeWarning, match=r"logger.tensorboard could not start .*goes on"):
        group = build_loggers(cfg, ENV, tmp_path)
        group.log_metrics({"x": 1.0}, 1)
        group.flush()  # the loggers start in the background, ahead of anything sent to them
    assert [type(logger) for logger in group.loggers] == [JsonlLogger]
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 1.0}]
    group.finish()


def test_wandb_starts_in_the_background_thread_and_logs_offline(tmp_path):
    wandb = {"_target_": "trainer.loggers.wandb.WandbLogger"}
    group = build_loggers(make_config(logger={"wandb": wandb}), ENV, tmp_path)
    group.log_metrics({"train/loss": 0.5}, 3)
    group.flush()
    assert len(group.loggers) == 1  # started: no warning, not dropped
    group.finish()
    (records,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"train/loss" in records.read_bytes()  # the history record, written offline


def test_fit_returns_with_tensorboard_and_jsonl_written(tmp_path):
    trainer = make_trainer(
        tmp_path, logger={"tensorboard": TENSORBOARD, "jsonl": JSONL}, log_every_steps=4
    )
    state = trainer.fit()  # 2 epochs of 8 steps: log steps 4, 8, 12, 16
    logged = [row["step"] for row in rows(tmp_path / "metrics.jsonl") if "train/loss" in row]
    assert logged == [4, 8, 12, 16] and state.step == 16
    trainer.logger.finish()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8, 12, 16]


def test_progress_bar_shows_loss_throughput_and_the_last_step(tmp_path, capsys):
    trainer = make_trainer(tmp_path, callbacks=[ProgressBar()], log_every_steps=4)
    trainer.fit()
    drawn = capsys.readouterr().err
    assert "16/16" in drawn  # completed, even though most steps skip the update
    assert "loss" in drawn and "samples/s" in drawn and "eta" in drawn
    loss = trainer.state.metrics["train/loss"]
    assert f"loss {loss:.4f}" in drawn


def test_progress_bar_draws_at_most_at_its_refresh_rate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # draw every update, as on a terminal
    # A rate of one draw a day: the bar is drawn as the fit starts and as it ends, never between.
    trainer = make_trainer(tmp_path, callbacks=[ProgressBar(refresh_per_second=1e-5)])
    trainer.fit()
    drawn = capsys.readouterr().err
    # the bar's frames ("epoch 1  8/16 ..."), not the line each validation prints above it
    assert set(re.findall(r"epoch \d+  (\d+)/16", drawn)) == {"0", "16"}


def test_progress_bar_draws_nothing_on_other_ranks(tmp_path, capsys):
    bar = ProgressBar()
    trainer = make_trainer(tmp_path, callbacks=[bar])
    trainer.state.rank = 1
    trainer.fit()
    assert bar.progress is None and capsys.readouterr().err == ""


def _shown_steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^epoch \d+  step (\d+)/\d+", text, flags=re.M)]


@pytest.mark.parametrize(
    ("every_s", "steps"), [(3600, [8, 16]), (0, [*range(1, 9), 8, *range(9, 17), 16])]
)
def test_without_a_terminal_progress_is_a_plain_line_at_an_interval_and_each_epochs_end(
    tmp_path, capsys, every_s, steps
):
    trainer = make_trainer(tmp_path, callbacks=[ProgressBar(plain_every_s=every_s)])
    trainer.fit()  # 2 epochs of 8 steps
    shown = capsys.readouterr().err  # not a terminal
    assert _shown_steps(shown) == steps
    # From the first validation (step 8's epoch end) on, the lines show its scores.
    scored = [line for line in shown.splitlines() if "val/loss" in line]
    first = max(i for i, step in enumerate(steps) if step == 8)  # the epoch-end line
    assert _shown_steps("\n".join(scored)) == steps[first:]


class ValidationScores(Callback):
    """(step, train/loss, val/loss, val/accuracy) as each validation ends."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float, float]] = []

    def on_eval_end(self, state: TrainState) -> None:
        names = ("train/loss", "val/loss", "val/accuracy")
        self.seen.append((state.step, *(state.metrics[name] for name in names)))


@pytest.mark.parametrize("terminal", [True, False])
def test_each_validation_is_shown_next_to_the_training_loss(tmp_path, terminal):
    """On a terminal a line above the bar, elsewhere the plain line at the epoch's end: the
    training loss, val/loss and val/accuracy as the fit logged them."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=terminal, width=120)
    scores = ValidationScores()
    trainer = make_trainer(tmp_path, callbacks=[scores, ProgressBar(console=console)])
    trainer.fit()  # 2 epochs of 8 steps, validation after each
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    lines = re.split(r"[\r\n]", plain)
    assert [step for step, *_ in scores.seen] == [8, 16]
    for step, train_loss, val_loss, val_accuracy in scores.seen:
        shown = f"step {step}/16  loss {train_loss:.4f}  val/loss {val_loss:.4f}  "
        shown += f"val/accuracy {val_accuracy:.4f}"
        assert any(shown in line for line in lines), (shown, plain)


def test_log_lines_print_above_the_bar_on_a_terminal(tmp_path, capsys):
    """A logging handler that writes to sys.stdout (Hydra's console handler) goes through the
    live bar's console while the bar is shown, not straight onto the bar's line."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    logger = logging.getLogger("tests.progress")
    handler = logging.StreamHandler(sys.stdout)
    logger.addHandler(handler)

    class Says(Callback):
        def on_step_end(self, state: TrainState) -> None:
            if state.step == 5:
                logger.warning("a line from step 5")

    trainer = make_trainer(tmp_path, callbacks=[ProgressBar(console=console), Says()])
    try:
        trainer.fit()
    finally:
        logger.removeHandler(handler)
    assert "a line from step 5" not in capsys.readouterr().out
    assert handler.stream is sys.stdout  # given back when the bar closed
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "a line from step 5" in re.split(r"[\r\n]", plain)  # a line of its own
