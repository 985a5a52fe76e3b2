"""The signals that end a fit cleanly rather than mid-step.

SIGTERM and SIGUSR1 (schedulers' preemption notices) and SIGINT (Ctrl-C) ask for a stop with a
checkpoint at the next step boundary; the loop turns the request into a stop that every rank
agrees on. A second Ctrl-C quits at once (Python's KeyboardInterrupt), as it would without
hooktrain. Under torchrun's agent every SIGINT is a stop request: the agent forwards the
terminal's Ctrl-C to each worker (hooktrain's own launcher's workers also get it from the
terminal), and it kills the workers itself when they do not exit in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(note: Callable[[str], None]) -> Iterator[None]:
    """While inside, each stop signal calls `note(signal name)` instead of its usual action."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    under_agent = "TORCHELASTIC_RUN_ID" in os.environ
    previous: dict[signal.Signals, object] = {}

    def handle(signum: int, frame: object) -> None:
        note(signal.Signals(signum).name)
        if signum == signal.SIGINT and not under_agent:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])  # the next Ctrl-C quits

    for sig in STOP_SIGNALS:
        # A job started in the background by a shell ignores Ctrl-C: it stays ignored.
        if not (sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN):
            previous[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
