"""Scale-out correctness on CPU with gloo: every strategy ends where one process ends.

Design of the parity test: the reference is a plain PyTorch loop written here, that draws each
epoch's order as `randperm(n, seed + epoch)` -- a *fresh* permutation per epoch. hooktrain runs the
same work as 2 (or 4) ranks whose global batch is the reference's batch. If the loop forgot
`sampler.set_epoch`, epoch 2 would repeat epoch 1's order and the weights would miss the
reference; `test_forgetting_set_epoch_is_caught` shows that this comparison does fail then.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from trainer.build import build_data, build_model, build_trainer, seed_everything
from trainer.callbacks.base import Callback
from trainer.callbacks.lr_schedule import WarmupCosine
from trainer.checkpoint import TRAINER_STATE
from trainer.config import CheckpointConfig, DataConfig, ParallelConfig, TrainConfig
from trainer.data.loaders import ResumableSampler
from trainer.distributed.env import DistEnv, distributed
from trainer.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

GLOBAL_BATCH = 32
EPOCHS = 2


def make_config(strategy: str, world: int, tp_degree: int = 0) -> TrainConfig:
    dp, _ = ParallelConfig(strategy=strategy, tp_degree=tp_degree).degrees(world)
    return TrainConfig(
        data=DataConfig(
            # 352 training samples (11 global batches), a validation split of 103: odd, and not a
            # multiple of the evaluation batch, so ranks hold shards of different lengths.
            dataset={
                "_target_": "trainer.data.datasets.synthetic",
                "num_samples": 515,
                "input_shape": [1, 8, 8],
                "val_fraction": 0.2,
                "test_fraction": 0.115,
            },
            batch_size=GLOBAL_BATCH // dp,
            eval_batch_size=16,
        ),
        model={
            "_target_": "trainer.models.TransformerClassifier",
            "dim": 32,
            "depth": 2,
            "heads": 4,
        },
        optim={"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9},
        schedule={"_target_": "trainer.callbacks.lr_schedule.WarmupCosine", "warmup_steps": 4},
        parallel=ParallelConfig(
            strategy=strategy, backend="gloo", timeout_s=60, tp_degree=tp_degree
        ),
        # One checkpoint, at log step 15: it must hold that step's own training loss.
        checkpoint=CheckpointConfig(save_final=False, every_steps=15),
        logger={"jsonl": {"_target_": "trainer.loggers.jsonl.JsonlLogger"}},
        max_epochs=EPOCHS,
        grad_clip=1.0,
        val_every_epochs=0,
        test_after_fit=False,
        log_every_steps=5,
    )


def _train_worker(cfg: TrainConfig, run_dir: str) -> dict:
    with distributed("cpu", cfg.parallel.backend, cfg.parallel.timeout_s) as env:
        trainer, _ = build_trainer(cfg, env, Path(run_dir))
        trainer.callbacks.append(StampStep())
        before = trainer.validate()  # identical initial weights everywhere: must match exactly
        trainer.fit()
        weights = get_model_state_dict(
            trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        trainer.logger.finish()
    weights = {k: v.clone() for k, v in weights.items()}
    return {"val_before": before, "weights": weights, "rows": logged_rows(run_dir)}


class StampStep(Callback):
    """Logs the number of the step about to run, in on_step_start: each row must show its own."""

    def on_step_start(self, state) -> None:
        state.log({"stamp/step": state.step + 1})


def logged_rows(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl of the run (rank 0 writes it), one dict per row."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def reference_loop(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Plain PyTorch: same init, a fresh permutation every epoch, global batch, clip, SGD, and
    torch's own LambdaLR driving the warm-up/cosine factor."""
    seed_everything(cfg.seed)
    splits = build_data(cfg)
    model = build_model(cfg, splits)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs, targets = splits.train.tensors
    n = len(inputs)
    total_steps = EPOCHS * (n // GLOBAL_BATCH)
    warmup_cosine = WarmupCosine(warmup_steps=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine.factor(step, total_steps)
    )
    for epoch in range(EPOCHS):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for start in range(0, n - GLOBAL_BATCH + 1, GLOBAL_BATCH):
            idx = order[start : start + GLOBAL_BATCH]
            loss = F.cross_entropy(model(inputs[idx]), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    return model.state_dict()


def one_process(cfg: TrainConfig, tmp_path: Path) -> dict:
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    tmp_path.mkdir(parents=True, exist_ok=True)
    trainer, _ = build_trainer(cfg, env, tmp_path)
    trainer.callbacks.append(StampStep())
    before = trainer.validate()
    trainer.fit()
    trainer.logger.finish()
    return {
        "val_before": before,
        "weights": trainer.model.state_dict(),
        "rows": logged_rows(tmp_path),
    }


def assert_same_weights(got: dict, want: dict, atol: float = 2e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    return reference_loop(make_config("none", 1))


def test_single_process_matches_plain_loop(reference, tmp_path):
    result = one_process(make_config("none", 1), tmp_path)
    assert_same_weights(result["weights"], reference)


@pytest.mark.parametrize(
    ("strategy", "world", "tp_degree"),
    [("ddp", 2, 0), ("fsdp", 2, 0), ("tp", 2, 0), ("fsdp_tp", 4, 2)],
)
def test_strategy_matches_one_process(strategy, world, tp_degree, reference, tmp_path):
    cfg = make_config(strategy, world, tp_degree)
    rank0 = launch(_train_worker, world, cfg, str(tmp_path))[0]
    assert_same_weights(rank0["weights"], reference)
    # Validation over shards of different lengths counts each sample once: exact equality.
    single = one_process(make_config("none", 1), tmp_path / "single")
    assert rank0["val_before"]["val/accuracy"] == single["val_before"]["val/accuracy"]
    assert rank0["val_before"]["val/loss"] == pytest.approx(
        single["val_before"]["val/loss"], rel=1e-6
    )
    # The logged training loss too, in one row per log step with its own step number and with
    # nothing logged after it, though ranks read a log step's all-reduce during the next step
    # (log steps 5, 10 and 20 here; step 10's next step is the epoch's last, 22 is the fit's,
    # and 15 is read at once, for its checkpoint, which holds that step's loss).
    assert_same_loss_rows(rank0["rows"], single["rows"], [5, 10, 15, 20, 22])
    saved = torch.load(
        tmp_path / "checkpoints" / "step_00000015" / TRAINER_STATE, weights_only=True
    )
    row_15 = next(row for row in rank0["rows"] if row["step"] == 15)
    assert saved["state"]["metrics"]["train/loss"] == row_15["train/loss"]


def assert_same_loss_rows(got: list[dict], want: list[dict], log_steps: list[int]) -> None:
    def loss_rows(rows: list[dict]) -> dict[int, dict]:
        return {row["step"]: row for row in rows if "train/loss" in row}

    got_rows, want_rows = loss_rows(got), loss_rows(want)
    assert sorted(got_rows) == sorted(want_rows) == log_steps
    assert len(got) == len({row["step"] for row in got})  # one row per step
    assert all(row["stamp/step"] == step for step, row in got_rows.items())
    for step, row in want_rows.items():
        assert got_rows[step].keys() == row.keys(), step
        assert got_rows[step]["train/loss"] == pytest.approx(row["train/loss"], rel=1e-5), step
        assert got_rows[step]["lr"] == pytest.approx(row["lr"], rel=1e-6), step
        assert got_rows[step]["train/grad_norm"] == pytest.approx(
            row["train/grad_norm"], rel=1e-4
        ), step


@pytest.mark.parametrize(
    "model",
    [
        {"_target_": "trainer.models.CNN", "channels": [4, 8], "hidden": 16},
        {"_target_": "trainer.models.GRUClassifier", "hidden": 16},
    ],
    ids=["cnn", "gru"],
)
def test_tensor_parallel_plans_of_the_other_models_match_one_process(model, tmp_path):
    tp, single = make_config("tp", 2), make_config("none", 1)
    tp.model = single.model = model
    tp.max_epochs = single.max_epochs = 1
    rank0 = launch(_train_worker, 2, tp, str(tmp_path / "tp"))[0]
    assert_same_weights(rank0["weights"], one_process(single, tmp_path / "single")["weights"])


def _counting_worker(cfg: TrainConfig, run_dir: str) -> dict:
    """Trains like `_train_worker`, counting the gradient reductions that DDP (through a comm
    hook) or FSDP2 (through its reduce-scatter) start."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = []
    with distributed("cpu", cfg.parallel.backend, cfg.parallel.timeout_s) as env:
        trainer, _ = build_trainer(cfg, env, Path(run_dir))
        if cfg.parallel.strategy == "ddp":

            def counted_allreduce(process_group, bucket):
                calls.append(bucket.index())
                return allreduce_hook(process_group, bucket)

            trainer.model.register_comm_hook(None, counted_allreduce)
            trainer.fit()
        else:
            reduce_scatter = torch.distributed.reduce_scatter_single

            def counted_reduce_scatter(*args, **kwargs):
                calls.append(0)
                return reduce_scatter(*args, **kwargs)

            torch.distributed.reduce_scatter_single = counted_reduce_scatter
            try:
                trainer.fit()
            finally:
                torch.distributed.reduce_scatter_single = reduce_scatter
        weights = get_model_state_dict(
            trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return {"reductions": len(calls), "steps": trainer.state.step, "weights": weights}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_reduces_gradients_once_per_step(strategy, reference, tmp_path):
    """grad_accum_steps=2 on 2 ranks: the same weights as one process with the whole global
    batch, and exactly as many gradient reductions as without accumulation (the first
    micro-batch of each step is not reduced)."""
    plain = make_config(strategy, 2)
    accumulated = make_config(strategy, 2)
    accumulated.grad_accum_steps = 2
    accumulated.data.batch_size = plain.data.batch_size // 2
    once = launch(_counting_worker, 2, plain, str(tmp_path / "plain"))[0]
    twice = launch(_counting_worker, 2, accumulated, str(tmp_path / "accumulated"))[0]
    assert twice["steps"] == once["steps"] == EPOCHS * 11
    assert once["reductions"] >= once["steps"]  # the counter sees the reductions at all
    assert twice["reductions"] == once["reductions"]
    assert_same_weights(twice["weights"], reference)


def test_forgetting_set_epoch_is_caught(reference, tmp_path, monkeypatch):
    """The parity comparison above fails when the sampler keeps epoch 0's order."""
    monkeypatch.setattr(ResumableSampler, "set_epoch", lambda self, epoch: None)
    result = one_process(make_config("none", 1), tmp_path)
    with pytest.raises(AssertionError):
        assert_same_weights(result["weights"], reference)


class _FailOnRankOne(Callback):
    def on_step_end(self, state) -> None:
        if state.rank == 1 and state.step == 3:
            raise RuntimeError("injected failure on rank 1 at step 3")


def _failing_worker(cfg: TrainConfig, run_dir: str) -> None:
    with distributed("cpu", "gloo", 60) as env:
        trainer, _ = build_trainer(cfg, env, Path(run_dir))
        trainer.callbacks.append(_FailOnRankOne())
        trainer.fit()


def test_exception_on_one_rank_ends_all_ranks_promptly(tmp_path):
    cfg = make_config("ddp", 2)
    cfg.max_epochs = 50  # would run for a long while if rank 0 were left waiting
    started = time.monotonic()
    with pytest.raises(ChildFailedError) as failure:
        launch(_failing_worker, 2, cfg, str(tmp_path))
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"ranks took {elapsed:.1f}s to stop"
    report = str(failure.value)
    assert "injected failure on rank 1 at step 3" in report
    assert "rank      : 1" in report or "rank: 1" in report


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """The real `torchrun` CLI: one shared run folder, every rank's log in it, world_size 2."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "trainer", "parallel=ddp", "data=synthetic", "data.dataset.num_samples=512",
        "model=mlp", "max_steps=12", "logger=[jsonl]", "callbacks=none",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/summary.json")]
    assert len(run_dirs) == 1, "all ranks must share one run folder"
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert {p.name for p in run_dirs[0].glob("hooktrain_rank*.log")} == {
        "hooktrain_rank0.log",
        "hooktrain_rank1.log",
    }
    logs = [(run_dirs[0] / f"hooktrain_rank{r}.log").read_text() for r in (0, 1)]
    assert [log.count("[INFO] - config (also in") for log in logs] == [1, 0]  # rank 0 only
    assert done.stdout.count("[INFO] - config (also in") == 1
