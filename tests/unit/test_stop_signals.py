"""Ctrl-C (a real SIGINT sent to this process) during a fit: the first stops at the step boundary
with a checkpoint, a second quits at once; under torchrun's agent every SIGINT is a stop request.
The CLI's side (exit 0, the summary) is in tests/integration/test_interrupted_runs.py."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.*

from tests.faults import SendSignal  # noqa: E402
from tests.helpers import make_trainer  # noqa: E402
from tests.resume_faults import SignalTwice  # noqa: E402
from trainer.checkpoint import verify  # noqa: E402


@pytest.fixture(autouse=True)
def _python_ctrl_c():
    """Ctrl-C as Python handles it by default (a launcher run earlier in the session may have
    left its own handler in this process)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[SendSignal("SIGINT", step=5)])
    state = trainer.fit()  # no KeyboardInterrupt
    assert state.step == 5 and state.stop_reason.startswith("received SIGINT")
    assert verify(tmp_path / "checkpoints" / "step_00000005")["step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_second_ctrl_c_quits_at_once(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[SignalTwice(step=5)])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.step == 4  # step 5 never finished
    assert not (tmp_path / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_under_torchruns_agent_every_ctrl_c_is_a_stop_request(tmp_path, monkeypatch):
    # The agent forwards Ctrl-C to its workers (and kills those that do not exit in time).
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[SignalTwice(step=5)])
    assert trainer.fit().step == 5
    assert verify(tmp_path / "checkpoints" / "step_00000005")["step"] == 5


def test_a_ctrl_c_that_was_ignored_stays_ignored(tmp_path):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a job a shell starts in the background
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[SendSignal("SIGINT", step=3)])
    assert trainer.fit().step == 6
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
