"""Knowledge distillation (`trainer.compress.distill`) and the pluggable `loss` node: the loss
against its formula written out here, alpha=0 against plain cross-entropy training bit for bit,
a teacher loaded from a real run folder (frozen, in eval mode, equal to that run's final model),
a resume mid-run against an uninterrupted run, and the bad inputs, in one line each."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import ADAMW, ENV, StepLosses, make_config, make_trainer
from trainer.build import build_trainer
from trainer.callbacks.base import Callback
from trainer.checkpoint import CheckpointError
from trainer.compress.distill import Distillation, distillation_loss
from trainer.config import ConfigError
from trainer.losses import check_loss
from trainer.state import TrainState

DISTILL = "trainer.compress.distill.Distillation"
TEACHER_MODEL = {"_target_": "trainer.models.MLP", "hidden": [32], "dropout": 0.0}
# The student: half the teacher's width, with dropout so that the RNG stream matters; AdamW so
# that the optimizer's state does; 8 steps an epoch.
STUDENT = {"model": {"hidden": [16], "dropout": 0.3}, "optim": ADAMW, "log_every_steps": 1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> dict[str, Any]:
    """A real teacher run: 16 steps, checkpoints at 8 and 16 (the final one), and its config.yaml
    as `hooktrain` writes it. Returns the folder and the final model."""
    run_dir = tmp_path_factory.mktemp("teacher")
    overrides = {"model": TEACHER_MODEL, "checkpoint": {"every_steps": 8, "save_final": True}}
    trainer, _ = build_trainer(make_config(**overrides), ENV, run_dir)
    trainer.fit()
    config = OmegaConf.structured(make_config(**overrides))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    return {"dir": run_dir, "model": copy.deepcopy(trainer.model).eval()}


def distill(teacher: Path, **node: Any) -> dict[str, Any]:
    return {"_target_": DISTILL, "_recursive_": False, "teacher": str(teacher), **node}


# ------------------------------------------------------------------------------- the formula


def by_hand(s, t, y, alpha: float, temp: float, t_squared: bool = True, batchmean: bool = True):
    """(1 - alpha) CE + alpha T^2 KL(p_t || p_s), the KL summed over classes and divided by the
    number of samples (batchmean), every token a sample. The flags give the usual mistakes."""
    s, t, y = s.reshape(-1, s.shape[-1]).float(), t.reshape(-1, t.shape[-1]).float(), y.flatten()
    log_p_s = s / temp - torch.logsumexp(s / temp, dim=-1, keepdim=True)
    log_p_t = t / temp - torch.logsumexp(t / temp, dim=-1, keepdim=True)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / (s.shape[0] if batchmean else s.numel())
    ce = -(s - torch.logsumexp(s, dim=-1, keepdim=True)).gather(1, y[:, None]).mean()
    return (1 - alpha) * ce + alpha * (temp**2 if t_squared else 1.0) * kl


@pytest.mark.parametrize(
    ("shape", "alpha", "temp", "dtype"),
    [
        ((32, 10), 0.5, 4.0, torch.float32),  # classification
        ((4, 7, 50), 0.7, 2.0, torch.float32),  # a language model's (B, T, V)
        ((32, 10), 1.0, 0.5, torch.float32),  # the teacher's term alone, T < 1
        ((32, 10), 0.3, 3.0, torch.bfloat16),  # autocast logits: computed in fp32
    ],
    ids=["classes", "tokens", "alpha1", "bf16"],
)
def test_the_loss_is_the_formula(shape, alpha, temp, dtype):
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(shape, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * 3).to(dtype)
    targets = torch.randint(shape[-1], shape[:-1], generator=gen)
    got = distillation_loss(student, teacher, targets, alpha, temp)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, by_hand(student, teacher, targets, alpha, temp))
    # Without T^2, or with the KL averaged over the classes too ("mean"), it would differ.
    for mistake in ({"t_squared": False}, {"batchmean": False}):
        assert not torch.allclose(got, by_hand(student, teacher, targets, alpha, temp, **mistake))


# ------------------------------------------------------------------------------- training


def test_alpha_zero_trains_exactly_as_cross_entropy(teacher_run, tmp_path):
    runs = {}
    for name, loss in (("default", None), ("alpha0", distill(teacher_run["dir"], alpha=0.0))):
        losses = StepLosses()
        extra = {"loss": loss} if loss else {}
        trainer = make_trainer(tmp_path / name, callbacks=[losses], **STUDENT, **extra)
        trainer.fit()
        runs[name] = (losses.losses, trainer.model.state_dict())
    (ce_losses, ce_weights), (kd_losses, kd_weights) = runs["default"], runs["alpha0"]
    assert len(ce_losses) == 16 and kd_losses == ce_losses
    for name, value in ce_weights.items():
        assert torch.equal(kd_weights[name], value), name


class TeacherWatch(Callback):
    """At every step's end: the teacher in eval mode throughout, with no gradient anywhere."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.teacher, self.steps = teacher, 0

    def on_step_end(self, state: TrainState) -> None:
        assert not any(m.training for m in self.teacher.modules())
        assert all(p.grad is None and not p.requires_grad for p in self.teacher.parameters())
        self.steps += 1


def test_the_teacher_is_the_teacher_runs_final_model_and_stays_frozen(teacher_run, tmp_path):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = teacher_run["model"](x)
    # A run folder (its newest checkpoint, the model node from its config.yaml), and a step
    # folder with the model node given.
    step_16 = teacher_run["dir"] / "checkpoints" / "step_00000016"
    for i, loss in enumerate(
        [distill(teacher_run["dir"]), distill(step_16, teacher_model=TEACHER_MODEL)]
    ):
        trainer = make_trainer(tmp_path / str(i), **STUDENT, loss=loss, max_epochs=1)
        teacher = trainer.loss.teacher
        with torch.no_grad():
            assert torch.equal(teacher(x), want)
    before = copy.deepcopy(teacher.state_dict())
    watch = TeacherWatch(teacher)
    trainer.callbacks.append(watch)
    trainer.fit()
    assert watch.steps == 8
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}


class CrashAt(Callback):
    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.at:
            raise RuntimeError(f"simulated crash before step {self.at}")


def test_a_resumed_distillation_matches_an_uninterrupted_one(teacher_run, tmp_path):
    setup = dict(STUDENT, loss=distill(teacher_run["dir"], alpha=0.7, temperature=2.0))
    straight = StepLosses()
    uninterrupted = make_trainer(tmp_path / "straight", callbacks=[straight], **setup)
    uninterrupted.fit()

    run_dir, every = tmp_path / "interrupted", {"every_steps": 5}
    crashed = make_trainer(run_dir, checkpoint=every, callbacks=[CrashAt(12)], **setup)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed_losses = StepLosses()
    resumed = make_trainer(
        run_dir, checkpoint=every, resume="auto", callbacks=[resumed_losses], **setup
    )
    resumed.fit()  # from step 10, mid-epoch
    assert resumed_losses.losses == straight.losses[10:] and len(straight.losses) == 16
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


# ------------------------------------------------------------------------------- bad input


def _damaged_copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir / "checkpoints" / "step_00000016", to)
    data = next(to.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-8])
    return to


def _with_model(run_dir: Path, to: Path, **model: Any) -> Path:
    """A copy of the run folder whose config.yaml has `model` in its model node."""
    shutil.copytree(run_dir, to)
    config = OmegaConf.load(to / "config.yaml")
    config.model = {"_target_": TEACHER_MODEL["_target_"], **model}
    (to / "config.yaml").write_text(OmegaConf.to_yaml(config))
    return to


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("missing", CheckpointError, r"^\S+/nothing: no such teacher run or checkpoint folder"),
        ("no checkpoint", CheckpointError, r"holds no complete checkpoint to load the teacher"),
        ("damaged", CheckpointError, r"\.distcp: checksum mismatch"),
        ("misfit", CheckpointError, r"step_00000016: does not fit the teacher model .*\[24, 8\]"),
        ("no config", ConfigError, r"^loss\.teacher_model: not given, and .*config\.yaml is miss"),
        ("bad config", ConfigError, r"^loss\.teacher_model\.hiden: unknown key .*read from \S+"),
        ("alpha", ConfigError, r"^loss\.alpha: must be in \[0, 1\], got 1\.5$"),
        ("negative alpha", ConfigError, r"^loss\.alpha: must be in \[0, 1\], got -0\.1$"),
        ("temperature", ConfigError, r"^loss\.temperature: must be > 0, got 0"),
        ("not a loss", ConfigError, r"^loss\._target_: torch\.nn\.CrossEntropyLoss is not a loss"),
    ],
)
def test_bad_input_is_one_line_before_training(teacher_run, tmp_path, case, error, match):
    run_dir = teacher_run["dir"]
    loss = {
        "missing": lambda: distill(tmp_path / "nothing"),
        "no checkpoint": lambda: distill(tmp_path),
        "damaged": lambda: distill(_damaged_copy(run_dir, tmp_path / "checkpoints" / "step_16")),
        "misfit": lambda: distill(run_dir, teacher_model={**TEACHER_MODEL, "hidden": [24]}),
        # A step folder with no run folder around it: no config.yaml to read the model from.
        "no config": lambda: distill(shutil.copytree(run_dir / "checkpoints", tmp_path / "ckpt")),
        "bad config": lambda: distill(_with_model(run_dir, tmp_path / "run", hiden=[32])),
        "alpha": lambda: distill(run_dir, alpha=1.5),
        "negative alpha": lambda: distill(run_dir, alpha=-0.1),
        "temperature": lambda: distill(run_dir, temperature=0),
        "not a loss": lambda: {"_target_": "torch.nn.CrossEntropyLoss"},
    }[case]()
    with pytest.raises(error, match=match) as info:
        build_trainer(make_config(**STUDENT, loss=loss), ENV, tmp_path / "student")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "student" / "checkpoints").exists()
    if error is ConfigError and "config" not in case:  # what the config alone decides
        with pytest.raises(ConfigError, match=match):
            check_loss(loss, ["trainer.", "torch."])


def test_setup_is_needed_before_the_first_call():
    loss = Distillation(teacher="anywhere")
    with pytest.raises(RuntimeError, match="setup"):
        loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, 2))
