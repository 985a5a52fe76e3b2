"""Magnitude pruning: one-shot after training (with optional fine-tune epochs) or gradual during it.

    callbacks=[progress,pruning]                   # one-shot L1 (global) to 50% after training
    callbacks=[progress,pruning_gradual]           # Zhu & Gupta's cubic schedule during training
    callbacks.pruning.sparsity=0.9 callbacks.pruning.finetune_epochs=5
    callbacks.pruning.method=structured callbacks.pruning.scope=layer
    'callbacks=[progress,pruning,quantize]'        # prune, then quantize the result

When it prunes (`schedule`), with E = max_epochs (or max_steps / steps_per_epoch) and
f = `finetune_epochs`:

    oneshot, f = 0    after the last step and the last validation (`on_fit_end`)
    oneshot, f > 0    before the first step of epoch E - f; the last f epochs fine-tune with the
                      masks held
    gradual           from step t0 = start_epoch * steps_per_epoch, every Δt = `every_steps` steps,
                      to sparsity s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3, the last pruning
                      at t0 + nΔt <= the start of epoch E - f; then f epochs at s_f

Masks are computed from the full weights (gathered from FSDP2 shards, a collective), identical on
every rank (rank 0's are broadcast), held by this callback and multiplied into the weights after
every optimizer step, so pruned weights stay exactly zero. Structured pruning masks the coupled
channel groups of Torch-Pruning's dependency graph (`trainer.pruning.graph`: residual sums,
attention heads), and exports the physically shrunk model, checked to compute the masked
model's outputs. No `torch.nn.utils.prune` reparametrization is left on the model (it would
break DDP and FSDP2). At `on_fit_end` the final sparsity is reached if it was not yet (an early
stop) and the zeros are final.

The run's compression report (`trainer.compress.report`) gets this callback's rows: `dense`
right before the first pruning, `pruned` when the final sparsity is reached, and `fine-tuned` at
`on_fit_end` when steps were trained after that; rank 0 measures each and every rank adds the
same row. Per-layer sparsity is logged as `pruning/...` metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.callbacks.base import Callback
from trainer.compress.report import Timing
from trainer.compress.samples import fixed_samples
from trainer.distributed.env import broadcast_object, several_ranks
from trainer.distributed.parallelize import unwrap
from trainer.pruning import graph as G
from trainer.pruning import masks as M
from trainer.pruning.report import flat_metrics, size_report
from trainer.pruning.shrink import (
    check_exact,
    full_state_dict,
    parameter_count,
    plain_copy,
    save_pruned,
    shrink,
)
from trainer.pruning.stages import Stages
from trainer.state import TrainState

SCHEDULES = ("oneshot", "gradual")

log = logging.getLogger("hooktrain.pruning")


class Pruning(Callback):
    """Prune the weights of Linear and Conv layers by magnitude; see the module docstring.

    Args:
        sparsity: the final fraction s_f of the selected weights set to zero (structured: of the
            units of each channel group: channels, or whole heads of attention).
        method: `unstructured` (single weights by |w|, torch's L1Unstructured) or `structured`
            (whole channel groups of Torch-Pruning's dependency graph, by the Ln norm of all the
            entries removed with them: the writers' rows, biases and BatchNorm entries, the
            readers' columns).
        scope: `global` (one |w| threshold over all pruned layers) or `layer` (each layer, or
            each channel group, to `sparsity`). Structured pruning needs `layer`.
        norm: n of the Ln norm ranking channel groups' units for structured pruning.
        schedule: `oneshot` or `gradual` (the cubic schedule of Zhu & Gupta, 2017).
        initial_sparsity: s_i, the sparsity of the first gradual pruning step.
        start_epoch: gradual pruning starts at the first step of this epoch (t0).
        every_steps: Δt, optimizer steps between gradual pruning steps.
        finetune_epochs: epochs trained at the final sparsity with the masks held, at the end.
        exclude: regexes searched in module names; matching layers are not pruned (structured:
            their output channels, and so the groups holding them; the output layer always).
        report_dir: folder for the exported model and the compression report (rank 0 writes);
            None: `run_dir` if the trainer supplies one, else nothing is written.
        export: write `pruned_model.pt` (unstructured: the full state dict, zeros included;
            structured: the shrunk model, read back with `trainer.pruning.shrink.load_pruned`).
        latency_batches, latency_repeats, latency_budget_s, compiled_latency: CPU latency of
            each report row, as `Quantize` measures it; `latency_repeats=0` adds no rows.
        run_dir: the run folder, when the trainer injects it.
    """

    edits_weights_at_fit_end = True  # the masks become plain zeros in the weights

    def __init__(
        self,
        sparsity: float = 0.5,
        method: str = "unstructured",
        scope: str = "global",
        norm: float = 2,
        schedule: str = "oneshot",
        initial_sparsity: float = 0.0,
        start_epoch: int = 0,
        every_steps: int = 10,
        finetune_epochs: int = 0,
        exclude: Sequence[str] = (),
        report_dir: str | None = None,
        export: bool = True,
        latency_batches: Sequence[int] = (1, 256),
        latency_repeats: int = 30,
        latency_budget_s: float = 20.0,
        compiled_latency: bool = True,
        run_dir: str | None = None,
    ) -> None:
        _check(0.0 <= sparsity < 1.0, "sparsity", f"must be in [0, 1), got {sparsity}")
        _check(
            0.0 <= initial_sparsity <= sparsity,
            "initial_sparsity",
            f"must be in [0, sparsity={sparsity}], got {initial_sparsity}",
        )
        _check(method in M.METHODS, "method", f"must be one of {M.METHODS}, got {method!r}")
        _check(scope in M.SCOPES, "scope", f"must be one of {M.SCOPES}, got {scope!r}")
        _check(
            not (method == "structured" and scope == "global"),
            "scope",
            "structured pruning ranks the units within each channel group: set scope=layer",
        )
        _check(schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {schedule!r}")
        _check(every_steps >= 1, "every_steps", f"must be >= 1, got {every_steps}")
        _check(start_epoch >= 0, "start_epoch", f"must be >= 0, got {start_epoch}")
        _check(finetune_epochs >= 0, "finetune_epochs", f"must be >= 0, got {finetune_epochs}")
        for pattern in exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"pruning.exclude: bad regex {pattern!r} ({err})") from None
        if method == "structured":
            try:
                G.torch_pruning()
            except ValueError as err:
                raise ValueError(f"pruning.method: {err}") from None
        timing = None
        if latency_repeats:
            timing = Timing.of_options(
                "pruning", latency_batches, latency_repeats, latency_budget_s, compiled_latency
            )
        self.final = float(sparsity)
        self.method = method
        self.scope = scope
        self.norm = norm
        self.schedule = schedule
        self.initial = float(initial_sparsity)
        self.start_epoch = start_epoch
        self.every_steps = every_steps
        self.finetune_epochs = finetune_epochs
        self.exclude = list(exclude)
        folder = report_dir if report_dir is not None else run_dir
        self.report_dir = Path(folder) if folder is not None else None
        self._stages = Stages(timing, self.report_dir if export else None, self.report_dir)

        # What a checkpoint keeps (state_dict): the full masks (True = kept) by parameter name,
        # structured: the removed channels of each group, the sparsity they reach, and where in
        # the schedule the run is.
        self.masks: dict[str, torch.Tensor] = {}
        self.removed: dict[str, list[int]] = {}
        self.sparsity = 0.0
        self.pruned_steps: list[int] = []
        self.final_step: int | None = None  # the step at which the final sparsity was reached
        self.finished = False
        self.report: dict[str, Any] = {}  # the summary logged as pruning/... at the fit's end

        self._params: dict[str, nn.Parameter] = {}
        self._local: dict[str, torch.Tensor] = {}  # masks shaped like each (local) parameter
        self._weights: list[str] = []
        self._groups: list[G.ChannelGroup] = []  # structured: the coupled channel groups
        self._skipped: dict[str, str] = {}  # structured: group root -> why it is not pruned
        self._example: torch.Tensor | None = None  # structured: the input graphs are traced with
        self._checked = False  # structured: shrinking was checked to be exact on this model

    # ------------------------------------------------------------------------------ schedule
    def plan(self, max_steps: int, steps_per_epoch: int) -> dict[str, int | None]:
        """Where pruning happens in a fit of `max_steps`: t0, Δt, n, and the end of pruning."""
        end = max_steps - self.finetune_epochs * steps_per_epoch
        if self.schedule == "oneshot":
            _check(
                end >= 0,
                "finetune_epochs",
                f"{self.finetune_epochs} epochs of {steps_per_epoch} steps exceed the {max_steps}"
                " steps of the fit",
            )
            at = end if self.finetune_epochs else None  # None: at on_fit_end
            return {"start": at, "every": self.every_steps, "num_prunes": 0, "end": at}
        start = self.start_epoch * steps_per_epoch
        _check(
            end >= start,
            "start_epoch",
            f"gradual pruning from step {start} (start_epoch={self.start_epoch}) must start "
            f"before the fine-tune epochs begin at step {end} of {max_steps}",
        )
        n = (end - start) // self.every_steps
        return {"start": start, "every": self.every_steps, "num_prunes": n, "end": end}

    def target(self, step: int) -> float:
        """The sparsity the schedule asks for once `step` optimizer steps are done."""
        plan = self._plan
        if plan["start"] is None:
            return 0.0  # oneshot at fit end
        if self.schedule == "oneshot":
            return self.final if step >= plan["start"] else 0.0
        return M.cubic_sparsity(
            step,
            final=self.final,
            initial=self.initial,
            start=plan["start"],
            every=plan["every"],
            num_prunes=plan["num_prunes"],
        )

    # ------------------------------------------------------------------------------ hooks
    def check_model(self, model: nn.Module) -> None:
        """Structured: refuse, before anything trains, a model whose channel groups cannot be
        shrunk exactly (needs an example input: the model's `input_shape`; else the check runs
        at `on_fit_start` on training samples)."""
        shape = getattr(model, "input_shape", None)
        if self.method != "structured" or not shape:
            return
        plain = plain_copy(model).eval().cpu()
        example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                plain(example)
        except Exception:  # it takes other inputs (token ids): checked on real samples later
            return
        self._find_groups(plain, example)

    def on_fit_start(self, state: TrainState) -> None:
        model = unwrap(state.model)
        structured = self.method == "structured"
        layers = M.prunable_layers(model, self.exclude, structured=structured)
        if not layers:
            raise ValueError(
                f"pruning: {type(model).__name__} has no Linear/Conv layer left to prune "
                f"(exclude={self.exclude})"
            )
        self._params = dict(model.named_parameters())
        self._weights = [f"{name}.weight" for name, _ in layers]
        self._plan = self.plan(state.max_steps, state.steps_per_epoch)
        if structured:
            plain = plain_copy(state.model).eval()  # a collective under FSDP2: every rank
            self._find_groups(plain, fixed_samples(state, 2, plain))
            touched = {s.param for group in self._groups for s in group.slices}
            self._weights = [name for name in self._weights if name in touched]
            if state.is_global_zero and self._skipped:
                left = "; ".join(f"{root}'s group ({why})" for root, why in self._skipped.items())
                log.info("pruning: not pruned: %s", left)
        if self.masks:  # resumed: the checkpoint's masks hold from here on
            missing = set(self.masks) - set(self._params)
            _check(not missing, "masks", f"the checkpoint masks name unknown params {missing}")
            self._install()
            self.apply()

    def on_step_start(self, state: TrainState) -> None:
        if self.finished:
            return
        target = self.target(state.step)
        if target > self.sparsity:
            self.prune(state, target)

    def on_step_end(self, state: TrainState) -> None:
        self.apply()  # after every optimizer step: pruned weights stay exactly zero
        if state.step == state.max_steps:  # no step follows: a pruning step due now is taken
            self.on_step_start(state)  # here, before the last validation sees the model

    def on_fit_end(self, state: TrainState) -> None:
        if self.finished:
            return
        if state.interrupted:  # the resumed run prunes, measures and exports at its own end
            if state.is_global_zero:
                log.info("pruning: the fit was interrupted; the resumed run finishes pruning")
            return
        if self.sparsity < self.final:  # oneshot at the end, or a fit stopped early
            self.prune(state, self.final)
        self.apply()
        self.finished = True  # the zeros are plain zeros in the weights from now on: permanent
        self._local = {}
        if self.method == "structured":  # a later stage (quantize) compresses the shrunk model
            state.deploy = lambda plain: self._deployed(plain)[0]
        if self.final_step is not None and state.step > self.final_step:
            self._stages.add(state, "fine-tuned", "trained with the masks held", self._deployed)
        if self._stages.timing is None:  # no rows measured: export the final model all the same
            self._stages.export(state, self._deployed)
        self.report = self._summary(state)
        state.log(flat_metrics(self.report))
        self._stages.write_report(state)

    # ------------------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune(self, state: TrainState, target: float) -> None:
        """Compute masks reaching `target` from the full weights (every rank, same order) and
        apply them; previously pruned weights stay pruned. The report's `dense` row is measured
        before the first pruning, its `pruned` row once `target` is the final sparsity."""
        if not self.pruned_steps:  # (a later stage of a compression pipeline has rows before)
            self._stages.add(state, "dense", "before pruning", only_first=True)
        if self.method == "unstructured":
            full = {name: _full(self._params[name]).detach() for name in self._weights}
            previous = {n: self.masks[n] for n in self._weights if n in self.masks}
            new = M.unstructured_masks(full, target, scope=self.scope, previous=previous)
            self.masks = {name: mask.cpu() for name, mask in _broadcast(new).items()}
        else:
            # In the groups' order, the same on every rank: each full_tensor is a collective.
            names = list(dict.fromkeys(s.param for group in self._groups for s in group.slices))
            full = {name: _full(self._params[name]).detach() for name in names}
            removed = G.choose(self._groups, full, target, norm=self.norm, previous=self.removed)
            self.removed = broadcast_object(removed)
            shapes = {name: self._params[name].shape for name in names}
            self.masks = G.group_masks(self._groups, self.removed, shapes)
        self.sparsity = target
        self.pruned_steps.append(state.step)
        self._install()
        self.apply()
        state.log(
            {
                "pruning/sparsity": M.sparsity_of({n: self.masks[n] for n in self._weights}),
                "pruning/target_sparsity": target,
            }
        )
        if target >= self.final:
            self.final_step = state.step
            self._stages.add(state, "pruned", f"{self.method} {self.final:.0%}", self._deployed)

    @torch.no_grad()
    def apply(self) -> None:
        """Multiply the held masks into the (local shards of the) weights."""
        for name, mask in self._local.items():
            self._params[name].mul_(mask)

    def _install(self) -> None:
        """Shape each full mask like its parameter: the local shard of a DTensor parameter."""
        self._local = {}
        for name, mask in self.masks.items():
            param = self._params[name]
            local = mask.to(device=param.device, dtype=param.dtype)
            if isinstance(param, DTensor):
                # Every rank holds the same full mask: cut the local piece, no communication.
                local = distribute_tensor(
                    local, param.device_mesh, param.placements, src_data_rank=None
                )
            self._local[name] = local

    def _find_groups(self, plain: nn.Module, example: torch.Tensor) -> None:
        """The channel groups of the plain `model` (every rank alike: the trace is
        deterministic); on the first call, check that shrinking them is exact."""
        self._example = example.cpu()
        plain = plain.cpu()
        ignored = _ignored_layers(plain, self.exclude)
        self._groups, self._skipped = G.channel_groups(plain, self._example, ignored)
        if not self._groups:
            reasons = "; ".join(f"{root}: {why}" for root, why in self._skipped.items())
            raise ValueError(
                f"pruning: {type(plain).__name__} has no channel group to prune structurally"
                + (f" ({reasons})" if reasons else f" (exclude={self.exclude})")
            )
        if not self._checked:
            weights = dict(plain.named_parameters())
            check_exact(plain, self._groups, G.choose(self._groups, weights, 0.5), self._example)
            self._checked = True

    # ------------------------------------------------------------------------------ report
    def _deployed(self, plain: nn.Module) -> tuple[nn.Module, Callable[[Path], Path]]:
        """The pruned model as deployed and how its artifact is written: structured, the shrunk
        model (`save_pruned`); unstructured, the full state dict with its zeros."""
        if self.method == "structured":
            small = check_exact(plain, self._groups, self.removed, self._example).eval()
            return small, lambda path: save_pruned(path, small, self.removed, self._example)

        def write(path: Path) -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(plain.state_dict(), path)
            return path

        return plain, write

    def _summary(self, state: TrainState) -> dict[str, Any]:
        """What this callback did, beyond the report's rows: sparsity per layer, parameters,
        sizes, and (structured) the shrunk model's shapes. Every rank computes it."""
        weights = full_state_dict(state.model)  # a collective under FSDP2: every rank
        summary: dict[str, Any] = {
            "method": self.method,
            "target_sparsity": self.final,
            "pruned_at_steps": list(self.pruned_steps),
            **size_report(weights, self._weights),
        }
        if self.method == "structured":
            summary["removed"] = dict(self.removed)
            summary["groups_skipped"] = dict(self._skipped)
            if state.is_global_zero:  # the same on every rank: the shapes come from `removed`
                small = shrink(plain_copy(state.model, weights), self.removed, self._example)
                summary["shrunk_params"] = parameter_count(small)
                summary["shrunk_shapes"] = {k: list(v.shape) for k, v in small.state_dict().items()}
                summary["size_bytes"]["shrunk"] = sum(
                    t.numel() * t.element_size() for t in small.state_dict().values()
                )
            summary = broadcast_object(summary)
        return summary

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.clone() for name, mask in self.masks.items()},
            "removed": {root: list(channels) for root, channels in self.removed.items()},
            "sparsity": self.sparsity,
            "pruned_steps": list(self.pruned_steps),
            "final_step": self.final_step,
            "finished": self.finished,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {name: mask.bool().cpu() for name, mask in state["masks"].items()}
        self.removed = {root: [int(c) for c in cs] for root, cs in state["removed"].items()}
        self.sparsity = float(state["sparsity"])
        self.pruned_steps = [int(s) for s in state["pruned_steps"]]
        self.final_step = state["final_step"]
        self.finished = bool(state["finished"])
        if self._params:  # loaded after on_fit_start: hold the new masks at once
            self._install()
            self.apply()


# ---------------------------------------------------------------------------------- helpers


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"pruning.{key}: {problem}")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _ignored_layers(model: nn.Module, exclude: Sequence[str]) -> list[str]:
    """Layers whose output channels stay: the output layer (its rows are classes) and those
    matching `exclude`."""
    layers = [
        n for n, m in model.named_modules() if isinstance(m, (*M.PRUNABLE, nn.MultiheadAttention))
    ]
    patterns = [re.compile(p) for p in exclude]
    last = [n for n, m in model.named_modules() if isinstance(m, M.PRUNABLE)][-1:]
    return sorted({*last, *(n for n in layers if any(p.search(n) for p in patterns))})


def _broadcast(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank (in the dict's order, the same on every rank)."""
    if not several_ranks():
        return masks
    out = {}
    for name, mask in masks.items():
        data = mask.to(torch.uint8).contiguous()
        dist.broadcast(data, src=0)
        out[name] = data.bool()
    return out
