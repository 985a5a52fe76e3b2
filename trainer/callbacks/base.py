"""The `Callback` base class. Its docstring is the map of the loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainer.state import TrainState


class Callback:
    """A plug-in for `Trainer.fit`. Override the hooks you need; each receives the `TrainState`.

    Where each hook fires (`trainer/loop.py` is the code of this picture)::

        (resume: load the checkpoint; the budget in steps is resolved again from max_epochs)
        on_fit_start                      after model, optimizer, loaders are built (and resumed)
        while not done:
            sampler.set_epoch(epoch)      # the loop does this, never a callback
            on_epoch_start
            for each optimizer step (grad_accum_steps micro-batches):
                on_step_start
                forward, backward, clip, optimizer.step()
                state.step += 1
                (log steps: the loss window is summed. Under torchrun one all-reduce of it
                and of every rank's should_stop flag starts. It is read at once on the last
                step, before a checkpoint and with `stops_on_log_steps`; otherwise while the
                next step runs, which then sends the log step's row)
                on_step_end               state.metrics holds "train/loss" once it is read
                log metrics, save a checkpoint when due (the logs are flushed first; the
                                          epoch's last step is saved after the epoch's end),
                stop if should_stop       (one process: after any step. Ranks: after a step
                                          that read an all-reduce, if any rank's flag was set
                                          when it started; see `stops_on_log_steps`)
            validate -> on_eval_end       state.metrics holds "val/loss", "val/accuracy"
            on_epoch_end
            agree on should_stop
            save a checkpoint when due    (its score is this validation's; a resume from it
                                          starts the next epoch)
        (the final checkpoint is written here, before on_fit_end)
        on_fit_end                        after the last step; the model is still wrapped
        on_exception                      instead of the rest, if anything above raised

    A `max_steps` budget that ends inside an epoch leaves that epoch open: no validation and no
    on_epoch_end for it, so that a resumed run continues inside it. After fit, the command line
    evaluates the test split: on_eval_end fires once more with "test/..." metrics.

    Callbacks run in config order. The loop looks up `on_step_start` and `on_step_end` once per
    epoch (they run on every step), so a callback added to `trainer.callbacks`, or a hook
    replaced, during an epoch takes part in those two from the next epoch on. To stop, call `state.request_stop(reason)`: the loop reduces
    the request across ranks so that every rank stops after the same step. Under torchrun that
    is one step after the next log step whose all-reduce starts after the request (at most
    `log_every_steps` + 1 steps later), or the epoch's end if it comes first. To log, call
    `state.log({...})`. `state.measure("val")` evaluates quietly (every rank must call it).
    Whatever `state_dict()` returns is saved in checkpoints and handed back to
    `load_state_dict()` on resume; keep it to tensors and plain Python values. SIGTERM, SIGUSR1
    and Ctrl-C (SIGINT) become a stop request with a checkpoint at the next step boundary
    (`trainer/stop_signals.py`).
    """

    # True where `on_fit_end` changes the weights for good (pruning makes its zeros permanent):
    # a callback after it that restores earlier weights would undo that.
    edits_weights_at_fit_end = False
    # True where `on_step_end` checks a stop condition on log steps (step-based early stopping):
    # under torchrun the loop then reads each log step's all-reduce at once (so "train/loss" is
    # there for the check) and agrees on stopping right after on_step_end (one more all-reduce),
    # so that the stop lands on that very step on every rank.
    stops_on_log_steps = False

    @classmethod
    def config_order_error(
        cls, node: Mapping[str, Any], earlier: Sequence[tuple[str, type]]
    ) -> str | None:
        """Config validation asks each callback class, with its config `node` and the (name,
        class) of every callback listed before it, whether that order is wrong; a message
        refuses the config before anything is built."""
        return None

    def on_fit_start(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def on_step_start(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_eval_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_fit_end(self, state: TrainState) -> None: ...
    def on_exception(self, state: TrainState, error: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


HOOKS = (
    "on_fit_start",
    "on_epoch_start",
    "on_step_start",
    "on_step_end",
    "on_eval_end",
    "on_epoch_end",
    "on_fit_end",
)
