"""Liu et al. 2023's early and late schedules ("Dropout Reduces Underfitting"), rebuilt with numpy
as their code builds them, for the dropout and stochastic depth schedule tests to compare with."""

from __future__ import annotations

import numpy as np


def liu_schedule(rate: float, steps: int, cutoff: int, mode: str, schedule: str) -> np.ndarray:
    """The rate for each iteration of a run of `steps` (drop_scheduler.py of
    facebookresearch/dropout, with the cutoff in iterations): early = linspace(rate, 0, cutoff)
    or full(cutoff, rate), then zeros; late = zeros for `cutoff` iterations, then full(rate).
    Training reads entry `it`, the global iteration (optimizer steps done before this one)."""
    if mode == "early":
        head = np.linspace(rate, 0, cutoff) if schedule == "linear" else np.full(cutoff, rate)
        return np.concatenate((head, np.full(steps - cutoff, 0.0)))
    return np.concatenate((np.full(cutoff, 0.0), np.full(steps - cutoff, rate)))
