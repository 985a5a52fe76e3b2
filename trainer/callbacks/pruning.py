"""Magnitude pruning: one-shot after training (with optional fine-tune epochs) or gradual during it.

    callbacks=[progress,pruning]                   # one-shot L1 (global) to 50% after training
    callbacks=[progress,pruning_gradual]           # Zhu & Gupta's cubic schedule during training
    callbacks.pruning.sparsity=0.9 callbacks.pruning.finetune_epochs=5
    callbacks.pruning.method=structured callbacks.pruning.scope=layer

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
every optimizer step, so pruned weights stay exactly zero. No `torch.nn.utils.prune`
reparametrization is left on the model (it would break DDP and FSDP2). At `on_fit_end` the final
sparsity is reached if it was not yet (an early stop), the zeros are final, and the report
(sparsity per layer and overall, parameters, size, CPU latency, accuracy before and after) is
logged as `pruning/...` metrics and written, with the exported model, to `report_dir`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.callbacks.base import Callback
from trainer.distributed.env import several_ranks
from trainer.distributed.parallelize import unwrap
from trainer.pruning import masks as M
from trainer.pruning.report import cpu_latency_ms, flat_metrics, size_report, write_report
from trainer.pruning.shrink import full_state_dict, parameter_count, plain_copy, shrink
from trainer.state import TrainState

SCHEDULES = ("oneshot", "gradual")
REPORT_FILE = "pruning_report.json"
MODEL_FILE = "pruned_model.pt"
SHRUNK_FILE = "pruned_model_shrunk.pt"


class Pruning(Callback):
    """Prune the weights of Linear and Conv layers by magnitude; see the module docstring.

    Args:
        sparsity: the final fraction s_f of the selected weights set to zero (structured: of the
            rows / output channels of each pruned layer).
        method: `unstructured` (single weights by |w|, torch's L1Unstructured) or `structured`
            (whole rows / output channels by Ln norm, torch's LnStructured; their biases and the
            entries of the BatchNorm that follows them too, so that a pruned channel is zero).
        scope: `global` (one |w| threshold over all pruned layers) or `layer` (each layer to
            `sparsity`). Structured pruning ranks rows within each layer: it needs `layer`.
        norm: n of the Ln norm ranking rows / channels for structured pruning.
        schedule: `oneshot` or `gradual` (the cubic schedule of Zhu & Gupta, 2017).
        initial_sparsity: s_i, the sparsity of the first gradual pruning step.
        start_epoch: gradual pruning starts at the first step of this epoch (t0).
        every_steps: Δt, optimizer steps between gradual pruning steps.
        finetune_epochs: epochs trained at the final sparsity with the masks held, at the end.
        exclude: regexes searched in module names; matching layers are not pruned (structured
            pruning always leaves the output layer alone).
        report_dir: folder for `pruning_report.json` and the exported model (rank 0 writes);
            None: `run_dir` if the trainer supplies one, else nothing is written.
        export: write `pruned_model.pt` (full state dict; structured: also the shrunk model's
            `pruned_model_shrunk.pt`).
        latency_batch, latency_repeats: CPU latency is the median of `latency_repeats` forward
            passes of a batch of `latency_batch` random inputs on one thread (0 repeats: skip).
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
        latency_batch: int = 256,
        latency_repeats: int = 30,
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
            "structured pruning ranks the rows / channels within each layer: set scope=layer",
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
        self.export = export
        self.latency_batch = latency_batch
        self.latency_repeats = latency_repeats

        # What a checkpoint keeps (state_dict): the full masks (True = kept) by parameter name,
        # the sparsity they reach, and where in the schedule the run is.
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0
        self.pruned_steps: list[int] = []
        self.before: dict[str, Any] | None = None  # accuracy before the first pruning
        self.validated_since_pruning = False
        self.finished = False
        self.report: dict[str, Any] = {}

        self._params: dict[str, nn.Parameter] = {}
        self._local: dict[str, torch.Tensor] = {}  # masks shaped like each (local) parameter
        self._weights: list[str] = []
        # Structured: weight name -> the 1-D parameters masked with its rows (its bias, and the
        # weight and bias of the BatchNorm after it).
        self._rows: dict[str, list[str]] = {}

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
        self._rows = M.row_parameters(model, layers) if structured else {}
        self._plan = self.plan(state.max_steps, state.steps_per_epoch)
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

    def on_eval_end(self, state: TrainState) -> None:
        if self.pruned_steps:
            self.validated_since_pruning = True

    def on_fit_end(self, state: TrainState) -> None:
        if self.finished:
            return
        if self.sparsity < self.final:  # oneshot at the end, or a fit stopped early
            self.prune(state, self.final)
        self.apply()
        self.finished = True  # the zeros are plain zeros in the weights from now on: permanent
        self._local = {}
        self.report = self._report(state)
        state.log(flat_metrics(self.report))
        if state.is_global_zero:
            self.write()

    # ------------------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune(self, state: TrainState, target: float) -> None:
        """Compute masks reaching `target` from the full weights (every rank, same order) and
        apply them; previously pruned weights stay pruned."""
        if self.before is None:
            self.before = self._accuracy(state)
        full = {name: _full(self._params[name]).detach() for name in self._weights}
        previous = {n: self.masks[n] for n in self._weights if n in self.masks}
        if self.method == "unstructured":
            new = M.unstructured_masks(full, target, scope=self.scope, previous=previous)
        else:
            new = M.structured_masks(full, target, norm=self.norm, dim=0, previous=previous)
            rows = M.row_masks(new)
            new.update({p: rows[weight] for weight, names in self._rows.items() for p in names})
        self.masks = {name: mask.cpu() for name, mask in _broadcast(new).items()}
        self.sparsity = target
        self.pruned_steps.append(state.step)
        self.validated_since_pruning = False
        self._install()
        self.apply()
        state.log(
            {
                "pruning/sparsity": M.sparsity_of({n: self.masks[n] for n in self._weights}),
                "pruning/target_sparsity": target,
            }
        )

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

    # ------------------------------------------------------------------------------ report
    def _accuracy(self, state: TrainState) -> dict[str, Any]:
        """Accuracy now: through `state.measure` when the trainer provides it, else the latest
        validation (none before the first one)."""
        measure = getattr(state, "measure", None)
        if callable(measure):
            metrics: dict[str, Any] = {}
            for split in ("val", "test"):
                metrics.update(measure(split) or {})
            return {**metrics, "step": state.step, "source": "evaluated"}
        if "val/accuracy" not in state.metrics:
            return {"step": state.step, "source": "no validation yet"}
        return {
            "val/accuracy": state.metrics["val/accuracy"],
            "val/loss": state.metrics.get("val/loss", float("nan")),
            "step": state.step,
            "source": "latest validation",
        }

    def _report(self, state: TrainState) -> dict[str, Any]:
        after = None
        if callable(getattr(state, "measure", None)) or self.validated_since_pruning:
            after = self._accuracy(state)
        weights = full_state_dict(state.model)  # a collective under FSDP2: every rank
        report: dict[str, Any] = {
            "method": self.method,
            "scope": self.scope,
            "schedule": self.schedule,
            "target_sparsity": self.final,
            "pruned_at_steps": list(self.pruned_steps),
        }
        if state.is_global_zero:
            report.update(size_report(weights, self._weights))
            measured = self._measure(state.model, weights)
            if "size_bytes_shrunk" in measured:
                report["size_bytes"]["shrunk"] = measured.pop("size_bytes_shrunk")
            report.update(measured)
            report["accuracy"] = {"before": self.before, "after": after}
            report["accuracy_note"] = (
                "test/accuracy in summary.json is measured after fit, on the pruned model"
            )
        if several_ranks():
            box = [report]
            dist.broadcast_object_list(box, src=0)  # every rank logs the same report
            report = box[0]
        return report

    def _measure(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Rank 0: latency of the pruned model on dense kernels, the shrunk model (structured),
        and the exported files."""
        out: dict[str, Any] = {"latency_ms": {}, "files": {}}
        plain = plain_copy(model, weights).eval()
        shrunk = None
        if self.method == "structured":
            try:
                shrunk = shrink(plain).eval()
            except ValueError as err:
                out["shrink_skipped"] = str(err)
        example = _example(plain, self.latency_batch)
        if example is not None:
            try:
                with torch.no_grad():
                    reference = plain(example)
            except Exception as err:  # an input the model cannot take (e.g. token ids)
                out["latency_skipped"] = f"no example input: {err}"
                example = None
        if shrunk is not None and example is not None:
            with torch.no_grad():
                if not torch.allclose(shrunk(example), reference, rtol=1e-4, atol=1e-5):
                    out["shrink_skipped"] = "the shrunk model's outputs differ; not exported"
                    shrunk = None
        if shrunk is not None:
            out["shrunk_params"] = parameter_count(shrunk)
            out["shrunk_shapes"] = {k: list(v.shape) for k, v in shrunk.state_dict().items()}
            out["size_bytes_shrunk"] = sum(
                t.numel() * t.element_size() for t in shrunk.state_dict().values()
            )
        if example is not None and self.latency_repeats > 0:
            out["latency_batch"] = self.latency_batch
            out["latency_ms"]["dense"] = cpu_latency_ms(plain, example, self.latency_repeats)
            if shrunk is not None:
                out["latency_ms"]["shrunk"] = cpu_latency_ms(shrunk, example, self.latency_repeats)
        if self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            if self.export:
                torch.save(weights, self.report_dir / MODEL_FILE)
                out["files"]["pruned_model"] = str(self.report_dir / MODEL_FILE)
                if shrunk is not None:
                    torch.save(shrunk.state_dict(), self.report_dir / SHRUNK_FILE)
                    out["files"]["pruned_model_shrunk"] = str(self.report_dir / SHRUNK_FILE)
            out["files"]["report"] = str(self.report_dir / REPORT_FILE)
        return out

    def write(self) -> Path | None:
        """Write the report (rank 0's `on_fit_end` calls it; returns the path, if any)."""
        if self.report_dir is None or not self.report:
            return None
        return write_report(self.report, self.report_dir / REPORT_FILE)

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.clone() for name, mask in self.masks.items()},
            "sparsity": self.sparsity,
            "pruned_steps": list(self.pruned_steps),
            "before": self.before,
            "validated_since_pruning": self.validated_since_pruning,
            "finished": self.finished,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {name: mask.bool().cpu() for name, mask in state["masks"].items()}
        self.sparsity = float(state["sparsity"])
        self.pruned_steps = [int(s) for s in state["pruned_steps"]]
        self.before = state["before"]
        self.validated_since_pruning = bool(state["validated_since_pruning"])
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


def _example(model: nn.Module, batch: int) -> torch.Tensor | None:
    """A fixed random float batch shaped like the model's `input_shape` (reference models)."""
    shape = getattr(model, "input_shape", None)
    if not shape or batch < 1:
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=generator)
