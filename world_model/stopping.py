"""Stopping a training run by Ctrl-C or SIGTERM without losing its steps: inside the training loop the first signal
asks the loop to stop at the end of its current step, where it writes a checkpoint; a second one stops at once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator, Optional

SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a cluster's scheduler) handled as Ctrl-C is: the run gives up its claim and says
    how to resume."""


def stop_now(signum: int) -> KeyboardInterrupt:
    """The exception a signal stops a command with: Terminated for SIGTERM, KeyboardInterrupt for Ctrl-C."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class StepStops:
    """While entered, Ctrl-C and SIGTERM only record that a stop was asked for; the loop calls `poll` where its state
    is whole (after a step), which saves a checkpoint and stops. A second signal stops at once, as does one during
    `at_once` (an evaluation, which a checkpoint precedes). `defer=False` (several torchrun processes, which could
    each stop at a different step, while a checkpoint is a collective) leaves the signals stopping at once."""

    def __init__(self, defer: bool = True):
        self.defer = defer and threading.current_thread() is threading.main_thread()  # only it can take signals
        self.requested: Optional[int] = None  # the signal that asked for a stop
        self._at_once = 0
        self._previous: dict = {}

    def __enter__(self) -> "StepStops":
        if self.defer:  # a signal the shell ignores (`cmd &` in a script ignores Ctrl-C) stays ignored
            self._previous = {s: signal.signal(s, self._asked) for s in SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _asked(self, signum: int, frame) -> None:
        if self.requested is not None or self._at_once:
            raise stop_now(signum)
        self.requested = signum
        if signum == signal.SIGTERM:  # a second SIGTERM kills at once (a loop stuck in a call that never returns)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        text = (f"\n{SIGNALS[signum]}: stopping after this step, with a checkpoint ({again} stops at once, from the "
                "last checkpoint)\n")
        with contextlib.suppress(OSError):  # to the file descriptor: a signal may come in the middle of a write to
            os.write(2, text.encode())      # sys.stderr, which must not be entered again

    def poll(self, save: Callable[[], None], saved: bool = False) -> None:
        """At the end of a step: if a stop was asked for, `save` a checkpoint (unless this step's is `saved`) and
        stop as the signal would have."""
        if self.requested is None:
            return
        if not saved:
            save()
        raise stop_now(self.requested)

    @contextlib.contextmanager
    def at_once(self) -> Iterator[None]:
        """A phase a signal stops at once: the checkpoint before it already holds every step."""
        self._at_once += 1
        try:
            yield
        finally:
            self._at_once -= 1
