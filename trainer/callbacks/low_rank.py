"""Low-rank factorization of the trained Linear and Conv layers, with optional fine-tune epochs.

    callbacks=[progress,low_rank]                        # factorize after training, by energy
    callbacks.low_rank.energy=null callbacks.low_rank.ratio=0.3   # or ceil(0.3 * full rank)
    callbacks.low_rank.finetune_epochs=5                 # the last 5 epochs fine-tune at rank r

Each planned layer's weight W (m x n; a Conv's read as out x in*kernel) becomes two factors of its
SVD (`trainer/compress/lowrank.py`: rank by kept energy or a ratio, a layer left alone where the
factors would not cut its parameters and FLOPs), from the trained weights.

With f = `finetune_epochs` > 0 and E the fit's epochs, the model keeps its dense structure while
it fine-tunes (no module swap: DDP, FSDP2, the optimizer and checkpoints see the same parameters)
and its weights are held at rank r, as pruning holds its masks. At the first step of epoch E - f
rank 0 plans from the full weights (gathered from FSDP2 shards) and broadcasts the plan and each
layer's subspaces U_r (m x r) and V_r (n x r) of its SVD; every rank then projects

    W <- U_r U_r^T W V_r V_r^T                  (the rank-r truncation at the phase start)

at once and after every optimizer step. Two matmuls, the same on every rank, no per-step SVD and
no per-step broadcast. `benchmarks/low_rank.py` measured it against the rank-r truncation of the
current W by a fresh SVD at every step: on the MNIST-1D CNN and MLP at half the FLOPs (3 seeds)
0.5 and 0.6 points of test accuracy apart, within the seeds' noise, for 1x against up to 25x the
fit's time. The rows `dense` (if the report has none yet) and `factorized` are measured there;
`fine-tuned` at the end. (Leave the input and output layers alone with `exclude`: by ratio their
ranks are tiny, 1 of 3 and 3 of 10 on the MNIST-1D CNN, which took it to chance level.)

At `on_fit_end` (f = 0: the plan is made there) the weights are rank r, so the factors of a plain
full-weight copy reproduce the fine-tuned layers to float tolerance; rank 0 factorizes it and
broadcasts the factors, so every rank holds the same factorized model (`self.factorized`). It is
evaluated on val and test through the loop's exact evaluation, rank 0 exports it as a
weights-only file of the plan and the state dict (`factorized_model.pt`, loaded back with
`trainer.compress.lowrank.load_factorized`) and measures its row; every rank adds the same row.
The trainer's own model ends with the rank-r weights (its dense structure kept), so a later
callback and the test after fit see the low-rank model. The plan and the subspaces are saved in
checkpoints: a run resumed inside the fine-tune epochs continues bit for bit.
"""

from __future__ import annotations

import copy
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.callbacks.base import Callback
from trainer.compress.lowrank import (
    FACTORIZABLE,
    apply_plan,
    check_factorizable,
    factorize,
    fill_factors,
    svd,
)
from trainer.compress.report import CompressionReport, Timing, measure_stage
from trainer.compress.samples import evaluated, fixed_samples
from trainer.distributed.env import broadcast_object
from trainer.distributed.parallelize import unwrap
from trainer.pruning.shrink import plain_copy
from trainer.state import TrainState

log = logging.getLogger("hooktrain")


class LowRank(Callback):
    """Factorize Linear and Conv layers by truncated SVD; see the module docstring.

    Args:
        energy: the rank of each layer keeps this fraction of sum(s^2) of its spectrum.
        ratio: the rank of each layer is ceil(ratio * full rank). Exactly one of the two, in
            (0, 1].
        finetune_epochs: epochs trained at the end with the weights held at rank r (0: factorize
            after the fit only).
        exclude: regexes searched in module names; matching layers are left alone.
        stage, finetuned_stage: the report's row names at factorizing and after fine-tuning.
        artifact: the exported file's name in the run folder.
        latency_batches, latency_repeats, latency_budget_s, compiled_latency: CPU latency of each
            row, as `trainer.compress.report.Timing`.
        run_dir: the run folder, injected by the trainer (None: nothing is written).
    """

    edits_weights_at_fit_end = True  # f = 0: the weights become rank r at on_fit_end

    def __init__(
        self,
        energy: float | None = 0.9,
        ratio: float | None = None,
        finetune_epochs: int = 0,
        exclude: Sequence[str] = (),
        stage: str = "factorized",
        finetuned_stage: str = "fine-tuned",
        artifact: str = "factorized_model.pt",
        latency_batches: Sequence[int] = (1, 256),
        latency_repeats: int = 30,
        latency_budget_s: float = 20.0,
        compiled_latency: bool = True,
        run_dir: str | None = None,
    ) -> None:
        _check(
            (energy is None) != (ratio is None),
            "energy",
            f"give exactly one of low_rank.energy or low_rank.ratio, got energy={energy!r}, "
            f"ratio={ratio!r} (to rank by ratio, set low_rank.energy=null)",
        )
        for key, value in (("energy", energy), ("ratio", ratio)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = value is None or (number and 0 < value <= 1)
            _check(ok, key, f"must be in (0, 1], got {value!r}")
        _check(finetune_epochs >= 0, "finetune_epochs", f"must be >= 0, got {finetune_epochs}")
        _check(stage != finetuned_stage, "finetuned_stage", f"must differ from stage {stage!r}")
        _check(
            bool(artifact) and Path(artifact).name == artifact,
            "artifact",
            f"must be a file name, got {artifact!r}",
        )
        for pattern in exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"low_rank.exclude: bad regex {pattern!r} ({err})") from None
        self.timing = Timing.of_options(
            "low_rank", latency_batches, latency_repeats, latency_budget_s, compiled_latency
        )
        self.energy = energy
        self.ratio = ratio
        self.finetune_epochs = finetune_epochs
        self.exclude = list(exclude)
        self.stage = stage
        self.finetuned_stage = finetuned_stage
        self.artifact = artifact
        self.run_dir = Path(run_dir) if run_dir is not None else None

        # What a checkpoint keeps (state_dict): the plan ({name: rank}), each planned layer's
        # subspaces (U_r: m x r, Vh_r: r x n, on the CPU) and factorize's per-layer records.
        self.plan: dict[str, int] = {}
        self.left: dict[str, torch.Tensor] = {}
        self.right: dict[str, torch.Tensor] = {}
        self.layers: dict[str, Any] = {}
        self.factorized: nn.Module | None = None  # the factorized model, once the fit has ended

        self._weights: dict[str, nn.Parameter] = {}  # name -> the (possibly sharded) weight
        self._local: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # subspaces on device
        self._start: int | None = None

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model with nothing to factorize (before anything trains)."""
        check_factorizable(model, ratio=self.ratio, exclude=self.exclude)

    def start_step(self, max_steps: int, steps_per_epoch: int) -> int | None:
        """The step whose start plans and projects: that of epoch E - f (None: at fit end)."""
        start = max_steps - self.finetune_epochs * steps_per_epoch
        _check(
            start >= 0,
            "finetune_epochs",
            f"{self.finetune_epochs} epochs of {steps_per_epoch} steps exceed the {max_steps} "
            "steps of the fit",
        )
        return start if self.finetune_epochs else None

    # ------------------------------------------------------------------------------ hooks
    def on_fit_start(self, state: TrainState) -> None:
        self._start = self.start_step(state.max_steps, state.steps_per_epoch)
        modules = unwrap(state.model).named_modules()
        self._weights = {n: m.weight for n, m in modules if isinstance(m, FACTORIZABLE)}
        self._install()  # resumed inside the fine-tune: the checkpoint's subspaces hold

    def on_step_start(self, state: TrainState) -> None:
        if not self.plan and self._start is not None and state.step >= self._start:
            self._begin(state)
            self._add_row(state, self.stage, self._factorized_copy(state))

    def on_step_end(self, state: TrainState) -> None:
        self.project()  # after every optimizer step: the weights stay rank r

    def on_fit_end(self, state: TrainState) -> None:
        if state.interrupted:
            if state.is_global_zero:
                log.info("low rank: the fit was interrupted; factorizing waits for the resumed run")
            return
        fine_tuned = bool(self.plan)
        if not fine_tuned:  # f = 0, or a fit that stopped before the fine-tune epochs
            self._begin(state)
        self.factorized = self._factorized_copy(state)
        self._add_row(
            state, self.finetuned_stage if fine_tuned else self.stage, self.factorized, export=True
        )
        if state.is_global_zero and self.run_dir is not None:
            CompressionReport.of(state).write(self.run_dir, state.step)

    # ------------------------------------------------------------------------------ projection
    def _begin(self, state: TrainState) -> None:
        """Plan on rank 0 from the full weights, broadcast, and project (every rank)."""
        plain = plain_copy(state.model).eval()  # a collective under FSDP2
        samples = fixed_samples(state, max(self.timing.batch_sizes))
        if not CompressionReport.of(state).rows:
            self._add_row(state, "dense", plain, note="the trained model before factorizing")
        planned = None
        if state.is_global_zero:
            try:
                planned = self._plan(plain, samples[:1])
            except ValueError as err:  # the trained spectrum pays nowhere: every rank stops
                planned = f"low rank: {err}"
        planned = broadcast_object(planned)
        if isinstance(planned, str):
            raise ValueError(planned)
        self.plan, self.left, self.right, self.layers = planned
        self._install()
        self.project()
        summary = {f"low_rank/rank/{name}": rank for name, rank in self.plan.items()}
        state.log({**summary, "low_rank/start_step": state.step})

    def _plan(self, plain: nn.Module, example: torch.Tensor) -> tuple:
        report = factorize(
            copy.deepcopy(plain),
            example=example,
            energy=self.energy,
            ratio=self.ratio,
            exclude=self.exclude,
        )
        left, right = {}, {}
        for name, rank in report["plan"].items():
            u, _, vh = svd(plain.get_submodule(name))
            left[name], right[name] = u[:, :rank].contiguous(), vh[:rank].contiguous()
        return report["plan"], left, right, report["layers"]

    def _install(self) -> None:
        """The subspaces on each weight's device, in the dtype the projection runs in."""
        self._local = {}
        for name in self.plan:
            weight = self._weights[name]
            kw = {"device": weight.device, "dtype": self.left[name].dtype}
            self._local[name] = (self.left[name].to(**kw), self.right[name].to(**kw))

    @torch.no_grad()
    def project(self) -> None:
        """W <- U_r (U_r^T W V_r) V_r^T for every planned layer. A sharded weight is gathered
        (a collective: every rank, same order), projected the same on every rank, and its own
        shard cut back out without communication."""
        for name, (left, right) in self._local.items():
            weight = self._weights[name]
            full = weight.full_tensor() if isinstance(weight, DTensor) else weight
            w = full.flatten(1).to(left.dtype)
            new = (left @ ((left.T @ w) @ right.T) @ right).reshape(full.shape).to(weight.dtype)
            if isinstance(weight, DTensor):
                new = distribute_tensor(
                    new, weight.device_mesh, weight.placements, src_data_rank=None
                )
            weight.copy_(new)

    # ------------------------------------------------------------------------------ rows
    def _factorized_copy(self, state: TrainState) -> nn.Module:
        """The factorized plain CPU model of the (rank-r) weights: rank 0's SVD factors on every
        rank (SVD is not bitwise repeatable across thread counts)."""
        plain = plain_copy(state.model).eval()  # a collective under FSDP2
        model = apply_plan(copy.deepcopy(plain), self.plan)
        factors = None
        if state.is_global_zero:
            for name in self.plan:
                layer = plain.get_submodule(name)
                fill_factors(model.get_submodule(name), layer, *svd(layer))
            factors = model.state_dict()
        model.load_state_dict(broadcast_object(factors))
        return model

    def _add_row(
        self,
        state: TrainState,
        stage: str,
        model: nn.Module,
        export: bool = False,
        note: str | None = None,
    ) -> None:
        """Evaluate `model` on every rank; rank 0 exports and measures the row, every rank adds
        the same row."""
        accuracy = evaluated(state, model)
        samples = fixed_samples(state, max(self.timing.batch_sizes))
        what = note or f"SVD factors at ranks {self.plan}"

        def measure(folder: Path) -> dict[str, Any]:
            path = None
            if export:
                path = folder / self.artifact
                torch.save({"plan": dict(self.plan), "state_dict": model.state_dict()}, path)
            return measure_stage(
                stage,
                model,
                samples,
                accuracy=accuracy,
                artifact=path,
                timing=self.timing,
                note=what + (f", {path.name}" if path and self.run_dir else ""),
            )

        row = None
        if state.is_global_zero:
            with tempfile.TemporaryDirectory() as scratch:
                folder = self.run_dir or Path(scratch)
                folder.mkdir(parents=True, exist_ok=True)
                row = measure(folder)
        CompressionReport.of(state).add(state, broadcast_object(row))

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "plan": dict(self.plan),
            "left": {name: t.clone() for name, t in self.left.items()},
            "right": {name: t.clone() for name, t in self.right.items()},
            "layers": copy.deepcopy(self.layers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan = {str(name): int(rank) for name, rank in state["plan"].items()}
        self.left = {name: t.cpu() for name, t in state["left"].items()}
        self.right = {name: t.cpu() for name, t in state["right"].items()}
        self.layers = state["layers"]
        if self._weights:  # loaded after on_fit_start
            self._install()


# ---------------------------------------------------------------------------------- helpers


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"low_rank.{key}: {problem}")
