"""Shared pieces of the compression tests: latency options that keep a report row to a fraction
of a second, and the tiny run that the 2-rank tests of each compression callback train (gloo,
CPU) and compare with one process."""

from __future__ import annotations

from typing import Any

from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig

# A row's latency: batches 1 and 8, 3 calls each within 0.05 s, not compiled.
FAST_LATENCY: dict[str, Any] = {
    "latency_batches": [1, 8],
    "latency_repeats": 3,
    "latency_budget_s": 0.05,
    "compiled_latency": False,
}


def two_rank_config(
    strategy: str, model: dict[str, Any], input_shape: list[int], callbacks: dict[str, Any]
) -> TrainConfig:
    """2 epochs of synthetic data, 4 classes: 256 training samples, 128 per rank in 8 steps of
    16; 32 test samples. AdamW, no schedule, no loggers, no checkpoint."""
    return TrainConfig(
        data=DataConfig(
            dataset={
                "_target_": "trainer.data.datasets.synthetic",
                "num_samples": 320,
                "input_shape": input_shape,
                "num_classes": 4,
            },
            batch_size=16,
            eval_batch_size=8,
        ),
        model=model,
        optim={"_target_": "torch.optim.AdamW", "lr": 1e-2},
        schedule=None,
        parallel=ParallelConfig(strategy=strategy, backend="gloo", timeout_s=60),
        callbacks=callbacks,
        logger={},
        checkpoint=CheckpointConfig(save_final=False),
        device="cpu",
        max_epochs=2,
        log_every_steps=4,
        test_after_fit=False,
    )
