"""The names of the metrics the loop logs into `state.metrics`, and which of them a fit has.

A monitor (`checkpoint.best_monitor`, a callback's `monitor`) watches one of these while the run
fits, so config validation checks monitors against `fit_metrics`. Callbacks log their own
metrics under their own names (`pruning/...`, `dropout/p`, `early_stopping/stopped_step`).
"""

from __future__ import annotations

TRAIN_LOSS = "train/loss"  # the mean over each log window, reduced across ranks
TRAIN_SPEED = "train/samples_per_second"
SKIPPED_STEPS = "train/skipped_steps"  # nonfinite=skip only
EPOCH = "epoch"
LR = "lr"  # parameter group 0; with several groups also "lr/group{i}"
LR_GROUPS = "lr/"
# Only the loop writes names in these namespaces.
LOOP_PREFIXES = ("train/", "val/", "test/", LR_GROUPS)


def eval_metrics(split: str) -> tuple[str, str]:
    """What evaluating `split` ("val", or "test" after the fit) logs: its loss and accuracy."""
    return f"{split}/loss", f"{split}/accuracy"


def fit_metrics(*, validates: bool, skips: bool) -> list[str]:
    """What the loop puts in `state.metrics` while fitting. `validates`: validation runs;
    `skips`: non-finite steps are skipped (nonfinite=skip). A name ending in "/" is a prefix."""
    names = [TRAIN_LOSS, TRAIN_SPEED, LR, LR_GROUPS, EPOCH]
    if skips:
        names.append(SKIPPED_STEPS)
    if validates:
        names.extend(eval_metrics("val"))
    return names
