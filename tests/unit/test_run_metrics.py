"""What a fit logs besides its loss: the gradient norm on every log step, and perplexity for a
language model. Real trainers (tests/helpers.py) write real metrics.jsonl files; each figure is
checked against plain PyTorch computed in the test on the same model and batches."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from tests.helpers import epoch_batches, make_trainer
from trainer.api import compose_config
from trainer.callbacks.progress import ProgressBar
from trainer.config import validate

JSONL = {"jsonl": {"_target_": "trainer.loggers.jsonl.JsonlLogger"}}
LOG_EVERY = 3


def rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def reference_norms(model, dataset, *, epochs: int, grad_clip: float) -> list[float]:
    """A plain loop with the trainer's SGD: each step's gradient norm before clipping, from
    torch's clip_grad_norm_ or, without clipping, by hand."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    norms = []
    for epoch in range(epochs):
        for x, y in epoch_batches(dataset, 32, epoch, seed=0, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if grad_clip > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item())
            else:
                squares = sum(p.grad.pow(2).sum() for p in model.parameters())
                norms.append(math.sqrt(squares.item()))
            optimizer.step()
    return norms


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_grad_norm_is_the_mean_over_each_log_window_of_the_norm_before_clipping(
    tmp_path, grad_clip
):
    trainer = make_trainer(tmp_path, logger=JSONL, grad_clip=grad_clip, log_every_steps=LOG_EVERY)
    model = copy.deepcopy(trainer.model)
    trainer.fit()  # 2 epochs of 8 steps: log steps 3, 6, ..., 15 and the last, 16
    trainer.logger.finish()
    norms = reference_norms(model, trainer.train_loader.dataset, epochs=2, grad_clip=grad_clip)
    if grad_clip:
        assert max(norms) > grad_clip  # the clipping did clip: the norm logged is the one before
    logged = {r["step"]: r["train/grad_norm"] for r in rows(tmp_path) if "train/grad_norm" in r}
    windows = [(s - LOG_EVERY, s) for s in (3, 6, 9, 12, 15)] + [(15, 16)]
    assert sorted(logged) == [end for _, end in windows]
    for start, end in windows:
        assert logged[end] == pytest.approx(sum(norms[start:end]) / (end - start), rel=1e-5)
    # A classifier has no perplexity.
    assert not any(k.endswith("/perplexity") for r in rows(tmp_path) for k in r)


def test_a_language_model_logs_perplexity_and_shows_it_after_validation(tmp_path):
    screen = io.StringIO()  # not a terminal: plain lines
    trainer = make_trainer(
        tmp_path,
        dataset={
            "_target_": "trainer.data.datasets.stdlib_text",
            "block_size": 16,
            "max_bytes": 4_000,
        },
        model={"_target_": "trainer.models.TinyGPT", "dim": 32, "depth": 1, "heads": 2},
        data={"batch_size": 16, "eval_batch_size": 24},
        logger=JSONL,
        max_epochs=1,
        log_every_steps=LOG_EVERY,
        callbacks=[ProgressBar(plain_every_s=3600, console=Console(file=screen, width=200))],
    )
    trainer.fit()
    trainer.logger.finish()
    logged = rows(tmp_path)
    train = [r for r in logged if "train/loss" in r]
    assert train and all("train/perplexity" in r for r in train)
    for row in train:
        assert row["train/perplexity"] == pytest.approx(math.exp(row["train/loss"]), rel=1e-12)
    # val/perplexity: exp of the mean cross-entropy over every token of the split, by hand.
    (val,) = [r for r in logged if "val/loss" in r]
    model = trainer.model.eval()
    x, y = trainer.val_loader.dataset.dataset.tensors
    with torch.no_grad():
        token_loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert val["val/perplexity"] == pytest.approx(math.exp(token_loss), rel=1e-5)
    assert val["val/perplexity"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-12)
    # The epoch's end line shows it next to the training loss.
    (line,) = [line for line in screen.getvalue().splitlines() if "val/" in line]
    shown = f"loss {train[-1]['train/loss']:.4f}  val/loss {val['val/loss']:.4f}  "
    assert shown + f"val/perplexity {val['val/perplexity']:.4f}" in line


@pytest.mark.parametrize("monitor", ["val/perplexity", "train/perplexity", "train/grad_norm"])
def test_the_new_metrics_are_monitors_the_config_accepts(monitor):
    overrides = ["model=gpt", "data=text", f"checkpoint.best_monitor={monitor}"]
    assert validate(compose_config(None, overrides)).checkpoint.best_monitor == monitor
