"""The names of the metrics the loop logs into `state.metrics`, and which of them a fit has.

A monitor (`checkpoint.best_monitor`, a callback's `monitor`) watches one of these while the run
fits, so config validation checks monitors against `fit_metrics`. Callbacks log their own
metrics under their own names (`pruning/...`, `dropout/p`, `early_stopping/stopped_step`).
"""

from __future__ import annotations

TRAIN_LOSS = "train/loss"  # the mean over each log window, reduced across ranks
# The global gradient norm before clipping (computed also with grad_clip off), the mean over
# each log window like train/loss.
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_SPEED = "train/samples_per_second"
# Sequence models (a target per token): exp(train/loss), where that loss is the plain
# cross-entropy (not a distillation's mix, not label-smoothed).
TRAIN_PERPLEXITY = "train/perplexity"
SKIPPED_STEPS = "train/skipped_steps"  # nonfinite=skip only
EPOCH = "epoch"
LR = "lr"  # parameter group 0; with several groups also "lr/group{i}"
LR_GROUPS = "lr/"
# Only the loop writes names in these namespaces.
LOOP_PREFIXES = ("train/", "val/", "test/", LR_GROUPS)


def eval_metrics(split: str) -> tuple[str, str]:
    """What evaluating `split` ("val", or "test" after the fit) logs: its loss and accuracy."""
    return f"{split}/loss", f"{split}/accuracy"


def perplexity_metric(split: str) -> str:
    """What evaluating `split` logs besides `eval_metrics` for a sequence model: exp of its
    loss, the mean cross-entropy over every token."""
    return f"{split}/perplexity"


def fit_metrics(*, validates: bool, skips: bool, sequences: bool = True) -> list[str]:
    """What the loop puts in `state.metrics` while fitting. `validates`: validation runs;
    `skips`: non-finite steps are skipped (nonfinite=skip); `sequences`: the model predicts a
    target per token, so perplexity is logged (True where the model is not known yet: config
    validation, before anything is built). A name ending in "/" is a prefix."""
    names = [TRAIN_LOSS, TRAIN_GRAD_NORM, TRAIN_SPEED, LR, LR_GROUPS, EPOCH]
    if sequences:
        names.append(TRAIN_PERPLEXITY)
    if skips:
        names.append(SKIPPED_STEPS)
    if validates:
        names.extend(eval_metrics("val"))
        if sequences:
            names.append(perplexity_metric("val"))
    return names
