"""Knowledge distillation (Hinton et al. 2015): the student learns from a trained teacher's
softened outputs as well as from the labels. A `loss` node (recipes/loss/distill.yaml):

    loss:
      _target_: trainer.compress.distill.Distillation
      _recursive_: false        # the loss builds the teacher itself, with the data's shapes
      teacher: outputs/teacher  # a run folder (its newest complete checkpoint) or a step_N folder
      teacher_model: null       # null: the `model` node of the teacher run's config.yaml
      alpha: 0.5
      temperature: 1.0

    loss = (1 - alpha) * CE(student, targets)
           + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The KL is summed over the classes and averaged over the samples (`batchmean`; for a language
model every token is a sample, as in the cross-entropy): the true KL per sample, where `mean`
would also divide by the number of classes. Softmaxes run in fp32 under any autocast. T^2 keeps
the soft term's gradients on the scale of the hard term's, which shrink as 1/T^2.

The teacher is built like the model (same allowlist, the data's input_shape and num_classes), on
the student's device. Under FSDP2 it is sharded over the student's data-parallel mesh (each block,
then the root, the same mixed precision); otherwise (one process, DDP, TP) each rank holds a full
replica and runs it on its own batch. Its weights are the checkpoint's `model` entries, read by
DCP through the project's safe reader after `verify` (trainer/checkpoint_reader.py), resharded
to this run's layout by DCP. It is then frozen, in eval mode and run under no_grad; it is no part
of the model, so the loop's `model.train()`, the optimizer, checkpoints and the parameter count
never see it. A resumed run loads it again from the same folder.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from trainer.checkpoint import _cause
from trainer.checkpoint_reader import (
    MANIFEST,
    CheckpointError,
    ListedFilesReader,
    WeightsOnlyLoadPlanner,
    committed,
    read_metadata,
    verify,
)
from trainer.distributed.env import all_reduce_max, any_rank
from trainer.distributed.parallelize import apply_fsdp
from trainer.errors import ConfigError
from trainer.losses import Loss, flat_cross_entropy
from trainer.targets import build, check_target

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from trainer.config import TrainConfig
    from trainer.data.datasets import DataSplits
    from trainer.distributed.env import DistEnv

# (checkpoint folder, its manifest, the teacher's model node, " (read from <its config.yaml>)")
Located = tuple[Path, dict[str, Any], dict[str, Any], str]
SHAPES = ("input_shape", "num_classes")  # what the teacher model is given, as the model is


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """`(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(teacher_T || student_T)` for
    logits (B, C) or (B, T, V); in fp32."""
    hard = flat_cross_entropy(student, targets)
    student_t = F.log_softmax(student.flatten(0, -2).float() / temperature, dim=-1)
    teacher_t = F.log_softmax(teacher.flatten(0, -2).float() / temperature, dim=-1)
    # log_target: the teacher's log-probabilities, so a class it rules out costs no log(0).
    soft = F.kl_div(student_t, teacher_t, reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * temperature**2 * soft


class Distillation(Loss):
    """The distillation loss of a student against the teacher in the run or checkpoint folder
    `teacher`, whose model node is `teacher_model` (default: its run's config.yaml); see the
    module docstring."""

    def __init__(
        self,
        teacher: str,
        teacher_model: dict[str, Any] | None = None,
        alpha: float = 0.5,
        temperature: float = 1.0,
    ) -> None:
        _check_arguments(alpha=alpha, temperature=temperature)
        self.path = Path(teacher)
        if isinstance(teacher_model, DictConfig):  # Hydra hands nested nodes over unconverted
            teacher_model = OmegaConf.to_container(teacher_model, resolve=True)
        self.teacher_model = teacher_model
        self.alpha, self.temperature = alpha, temperature
        self.teacher: nn.Module | None = None  # built by setup

    @classmethod
    def check_config(cls, node: Mapping[str, Any], key: str, allowed: Sequence[str]) -> None:
        """Config validation: alpha and temperature in range, and an explicit teacher model node
        checked like the model's (the teacher folder is read when the run is built)."""
        try:
            _check_arguments(**{name: node[name] for name in _RANGES if name in node})
        except ValueError as err:
            raise ConfigError(f"{key}.{err}") from None
        if node.get("teacher_model") is not None:
            check_target(node["teacher_model"], f"{key}.teacher_model", allowed, injected=SHAPES)
            if node.get("_recursive_", True) is not False:
                raise ConfigError(
                    f"{key}._recursive_: must be false, so that Hydra leaves teacher_model to the "
                    "loss, which builds it with the data's input_shape and num_classes"
                )

    def setup(
        self, cfg: TrainConfig, env: DistEnv, mesh: DeviceMesh | None, splits: DataSplits
    ) -> None:
        # The teacher's random init (overwritten by the load) draws from a forked RNG, not from
        # the stream the student's training uses: alpha=0 then trains exactly as cross-entropy.
        with torch.random.fork_rng(devices=_cuda_indices(env.device)):
            folder, manifest, node, source = _on_every_rank(self._locate, env.device)
            shapes = {"input_shape": splits.input_shape, "num_classes": splits.num_classes}
            try:
                teacher = build(node, "loss.teacher_model", cfg.allowed_targets, **shapes)
            except ConfigError as err:
                raise ConfigError(f"{err}{source}") from None
        teacher.to(env.device)
        # Sharded before it is frozen: FSDP2 wraps the units that hold trainable parameters.
        if mesh is not None and cfg.parallel.strategy in ("fsdp", "fsdp_tp"):
            apply_fsdp(teacher, mesh["dp"], cfg.parallel)
        load_model_weights(teacher, folder, set(manifest["files"]), node["_target_"])
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()

    def _locate(self) -> Located:
        """The teacher's verified checkpoint folder, its manifest, and its model node with
        where that was read from."""
        folder, manifest = teacher_checkpoint(self.path)
        if self.teacher_model is not None:
            return folder, manifest, self.teacher_model, ""
        return folder, manifest, *teacher_model_node(folder)

    def __call__(
        self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor
    ) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("Distillation.setup(...) builds the teacher before the first step")
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return distillation_loss(logits, teacher_logits, targets, self.alpha, self.temperature)


# ------------------------------------------------------------------------- the teacher's files


def teacher_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint `path` names, verified, and its manifest: a `step_N` folder itself, or the
    newest one that verifies in a run folder (or its `checkpoints/`)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such teacher run or checkpoint folder (loss.teacher)")
    if (path / MANIFEST).exists():
        return path, verify(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for folder in reversed(committed(root)):
        try:
            return folder, verify(folder)
        except CheckpointError as err:
            warnings.warn(f"skipping teacher checkpoint: {err}", RuntimeWarning, stacklevel=2)
    raise CheckpointError(
        f"{path}: holds no complete checkpoint to load the teacher from (loss.teacher takes a "
        "run folder or a checkpoints/step_N folder)"
    )


def teacher_model_node(folder: Path) -> tuple[dict[str, Any], str]:
    """The `model` node of the run that wrote the checkpoint `folder` (its run folder's
    config.yaml, written by `hooktrain`), and where it was read from, for error messages."""
    config = folder.parent.parent / "config.yaml"
    if folder.parent.name != "checkpoints" or not config.is_file():
        raise ConfigError(
            f"loss.teacher_model: not given, and {config} is missing (the teacher run's config, "
            "where its model node is read from); give the teacher's model node as "
            "loss.teacher_model"
        )
    try:
        node = OmegaConf.to_container(OmegaConf.load(config), resolve=True)["model"]
        if not isinstance(node, dict):
            raise TypeError(f"the model entry is a {type(node).__name__}")
    except Exception as err:  # unreadable YAML, no `model` entry, an unresolvable value
        raise ConfigError(
            f"loss.teacher_model: not given, and {config} holds no model node ({_cause(err)}); "
            "give the teacher's model node as loss.teacher_model"
        ) from None
    return node, f" (the teacher run's model node, read from {config})"


def load_model_weights(model: nn.Module, folder: Path, listed: set[str], name: str) -> None:
    """The `model` entries of the verified checkpoint `folder` (`listed`: its manifest's files)
    into `model`, plain or FSDP2-sharded; every one of them, and nothing the model lacks."""
    state = get_model_state_dict(model)
    reader = ListedFilesReader(folder, listed)
    saved = {k for k in read_metadata(folder, listed).state_dict_metadata if k.startswith("model.")}
    wanted = {f"model.{k}" for k in state}
    if extra := sorted(saved - wanted):  # DCP itself loads a subset without a word
        raise CheckpointError(
            f"{folder}: does not fit the teacher model {name}: the checkpoint holds "
            f"{', '.join(k.removeprefix('model.') for k in extra[:3])}"
            f"{' ...' if len(extra) > 3 else ''}, which it lacks; is loss.teacher_model the "
            "teacher run's model node?"
        )
    try:
        dcp.load({"model": state}, storage_reader=reader, planner=WeightsOnlyLoadPlanner())
        set_model_state_dict(model, state)
    except (Exception, dcp.api.CheckpointException) as err:  # DCP's is a BaseException
        raise CheckpointError(
            f"{folder}: does not fit the teacher model {name} ({_cause(err)}); is "
            "loss.teacher_model the teacher run's model node?"
        ) from None


# ------------------------------------------------------------------------------------- pieces

_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "alpha": (lambda a: 0 <= a <= 1, "must be in [0, 1]"),
    "temperature": (lambda t: t > 0, "must be > 0"),
}


def _check_arguments(**values: float) -> None:
    for name, value in values.items():
        in_range, what = _RANGES[name]
        if not in_range(value):
            raise ValueError(f"{name}: {what}, got {value!r}")


def _on_every_rank(locate: Callable[[], Located], device: torch.device) -> Located:
    """`locate()` on every rank, with its failure raised on every rank (before the load's
    collectives, where the others would wait for it) and the same checkpoint on every rank."""
    try:
        found, error = locate(), None
    except (CheckpointError, ConfigError) as err:
        found, error = None, err
    if any_rank([error is not None], device)[0]:
        raise error or CheckpointError("loss.teacher: another rank could not load the teacher")
    step = found[1].get("step")
    step = step if isinstance(step, int) else -1
    if all_reduce_max(step, device) != -all_reduce_max(-step, device):
        raise CheckpointError(
            f"{found[0]}: the ranks found different newest teacher checkpoints; name one "
            "checkpoints/step_N folder as loss.teacher"
        )
    return found


def _cuda_indices(device: torch.device) -> list[int]:
    """The CUDA device whose generator `fork_rng` must fork too (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
