"""Loggers and the progress bar: real TensorBoard and jsonl files read back, real rich output.

`LoggerGroup` writes from a background thread, so these tests also pin down what `flush()` and
`finish()` promise: everything sent before them is written, in order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import ENV, make_config, make_trainer  # noqa: E402
from trainer.build import build_loggers  # noqa: E402
from trainer.callbacks.progress import ProgressBar  # noqa: E402
from trainer.loggers.base import Logger, LoggerGroup  # noqa: E402
from trainer.loggers.jsonl import JsonlLogger  # noqa: E402

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
    assert " 0/16" in drawn and "16/16" in drawn
    assert not any(f" {step}/16" in drawn for step in range(1, 16))


def test_progress_bar_draws_nothing_on_other_ranks(tmp_path, capsys):
    bar = ProgressBar()
    trainer = make_trainer(tmp_path, callbacks=[bar])
    trainer.state.rank = 1
    trainer.fit()
    assert bar.progress is None and capsys.readouterr().err == ""
