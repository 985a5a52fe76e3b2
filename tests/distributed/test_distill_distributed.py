"""Distillation on 2 ranks over gloo (CPU): DDP with a replicated teacher, FSDP2 with the teacher
sharded like the student, and tensor parallel (the student's Linear pair split over the ranks,
the teacher whole on each) end where one process ends: the same logged losses and the same
weights. The teacher comes from a real run folder trained here in one process."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from tests.helpers import ENV, make_config
from trainer.build import build_trainer
from trainer.config import ParallelConfig
from trainer.distributed.env import distributed
from trainer.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

WORLD, GLOBAL_BATCH = 2, 32
TEACHER_MODEL = {"_target_": "trainer.models.MLP", "hidden": [32], "dropout": 0.0}
FULL = StateDictOptions(full_state_dict=True)  # on every rank


STRATEGIES = {"ddp": WORLD, "fsdp": WORLD, "tp": 1}  # strategy -> data-parallel ranks


def student_config(teacher: str, strategy: str, world: int):
    """A half-width student (no dropout: ranks draw other masks than one process would), AdamW,
    grad clipping: 8 global batches of 32 an epoch, 2 epochs. `world`: data-parallel ranks."""
    return make_config(
        model={"hidden": [16], "dropout": 0.0},
        optim={"_target_": "torch.optim.AdamW", "lr": 1e-2},
        data={"batch_size": GLOBAL_BATCH // world},
        loss={
            "_target_": "trainer.compress.distill.Distillation",
            "_recursive_": False,
            "teacher": teacher,
            "teacher_model": TEACHER_MODEL,
            "alpha": 0.6,
            "temperature": 3.0,
        },
        parallel=ParallelConfig(strategy=strategy, backend="gloo", timeout_s=60),
        grad_clip=1.0,
        logger={"jsonl": {"_target_": "trainer.loggers.jsonl.JsonlLogger"}},
    )


def _fit(cfg, env, run_dir: Path, probe: torch.Tensor) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer, _ = build_trainer(cfg, env, run_dir)
    teacher = trainer.loss.teacher
    sharded = any(isinstance(p, DTensor) for p in teacher.parameters())
    with torch.no_grad():
        teacher_out = teacher(probe)  # a collective under FSDP2: every rank runs it
    trainer.fit()
    trainer.logger.finish()
    log = run_dir / "metrics.jsonl"  # rank 0 logs
    rows = [json.loads(line) for line in log.read_text().splitlines()] if env.rank == 0 else []
    return {
        "losses": [row["train/loss"] for row in rows if "train/loss" in row],
        "weights": {
            k: v.clone() for k, v in get_model_state_dict(trainer.model, options=FULL).items()
        },
        "teacher": {k: v.clone() for k, v in get_model_state_dict(teacher, options=FULL).items()},
        "teacher_out": teacher_out,
        "sharded": sharded,
        "student_sharded": any(isinstance(p, DTensor) for p in trainer.model.parameters()),
        "frozen": all(not p.requires_grad and p.grad is None for p in teacher.parameters()),
        "eval": not any(m.training for m in teacher.modules()),
    }


def _worker(teacher: str, out_dir: str, probe: torch.Tensor) -> dict[str, dict[str, Any]]:
    # One launch runs every strategy: starting processes costs more than the fits.
    with distributed("cpu", "gloo", 60) as env:
        return {
            strategy: _fit(
                student_config(teacher, strategy, dp), env, Path(out_dir) / strategy, probe
            )
            for strategy, dp in STRATEGIES.items()
        }


def test_ddp_fsdp_and_tp_distillation_match_one_process(tmp_path):
    torch.set_num_threads(1)
    teacher_cfg = make_config(model=TEACHER_MODEL, checkpoint={"save_final": True})
    teacher_trainer, _ = build_trainer(teacher_cfg, ENV, tmp_path / "teacher")
    teacher_trainer.fit()
    final_teacher = copy.deepcopy(teacher_trainer.model).eval()
    probe = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))

    teacher = str(tmp_path / "teacher")
    single = _fit(student_config(teacher, "none", 1), ENV, tmp_path / "single", probe)
    ranks = launch(_worker, WORLD, teacher, str(tmp_path / "ranks"), probe)

    with torch.no_grad():
        want_out = final_teacher(probe)
    for strategy in STRATEGIES:
        got = ranks[0][strategy]
        assert got["sharded"] == (strategy == "fsdp"), strategy  # tp: the teacher stays whole
        assert got["student_sharded"] == (strategy != "ddp"), strategy
        assert got["frozen"] and got["eval"], strategy
        for name, value in final_teacher.state_dict().items():  # loaded whole, never changed
            assert torch.equal(got["teacher"][name], value), (strategy, name)
        torch.testing.assert_close(got["teacher_out"], want_out, rtol=0, atol=1e-6)
        assert len(got["losses"]) == len(single["losses"]) == 16
        assert got["losses"] == pytest.approx(single["losses"], rel=1e-5), strategy
        for name, value in single["weights"].items():
            torch.testing.assert_close(
                got["weights"][name], value, rtol=1e-4, atol=2e-5, msg=f"{strategy} {name}"
            )
    # Every rank ends with the same student.
    for strategy in STRATEGIES:
        for name, value in ranks[0][strategy]["weights"].items():
            assert torch.equal(ranks[1][strategy]["weights"][name], value), (strategy, name)
