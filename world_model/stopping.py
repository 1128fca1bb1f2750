"""Stopping a training run by Ctrl-C or SIGTERM without losing its steps: inside the training loop the first signal
asks the loop to stop at the end of its current step, where it writes a checkpoint; a second one stops at once. One
Ctrl-C key press counts once, however many times it is delivered. Under torchrun the processes first agree on the
step to stop at (`distributed.StopVote`)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from time import monotonic, sleep
from typing import Callable, Iterator, Optional

from . import distributed

SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
# A Ctrl-C this soon after the first is the same key press delivered twice: by the terminal to the whole foreground
# process group, and again by a wrapper that forwards what it got (uv run, some launchers: up to ~0.2 s later).
SAME_PRESS_S = 1.0
_last_signal: dict = {}  # signal -> when the last one that counted came (monotonic): one clock for the process


def _repeated(signum: int = signal.SIGINT) -> bool:
    """Whether this signal is a copy of the last one of its kind (within SAME_PRESS_S); if not, it becomes the
    last."""
    now, last = monotonic(), _last_signal.get(signum)
    if last is not None and now - last < SAME_PRESS_S:
        return True
    _last_signal[signum] = now
    return False


def ctrl_c(signum: int, frame) -> None:
    """Python's Ctrl-C (KeyboardInterrupt) once per key press, for a whole command (`run.py` installs it): a copy
    arriving while the command cleans up or says how to resume is ignored."""
    if not _repeated():
        raise KeyboardInterrupt


def wait_out_ctrl_c() -> None:
    """Before a command interrupted by Ctrl-C leaves (its handlers handed back): sleep out the window of a copy of
    that press still to come, at most SAME_PRESS_S."""
    last = _last_signal.get(signal.SIGINT)
    left = 0.0 if last is None else last + SAME_PRESS_S - monotonic()
    if left > 0:
        sleep(left)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a cluster's scheduler) handled as Ctrl-C is: the run gives up its claim and says
    how to resume."""


def stop_now(signum: int) -> KeyboardInterrupt:
    """The exception a signal stops a command with: Terminated for SIGTERM, KeyboardInterrupt for Ctrl-C."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class StepStops:
    """While entered, Ctrl-C and SIGTERM only record that a stop was asked for; the loop calls `poll` where its state
    is whole (after a step), which saves a checkpoint and stops. A second signal stops at once, as does one during
    `at_once` (an evaluation, which a checkpoint precedes). A Ctrl-C within SAME_PRESS_S of the last is taken for it,
    delivered twice, also after a stop (the way out waits out the window). Under torchrun, where each process gets
    the signal at a step of its own and a checkpoint is a collective, `poll` stops them all at the first step they
    agree on (`distributed.StopVote`), so every `poll` must be reached alike on every rank. `defer=False` leaves the
    signals stopping at once."""

    def __init__(self, defer: bool = True):
        self.defer = defer and threading.current_thread() is threading.main_thread()  # only it can take signals
        self.requested: Optional[int] = None  # the signal that asked for a stop
        self._at_once = 0
        self._previous: dict = {}
        self._vote = distributed.StopVote() if self.defer and distributed.can_vote() else None

    def __enter__(self) -> "StepStops":
        if self.defer:  # a signal the shell ignores (`cmd &` in a script ignores Ctrl-C) stays ignored
            self._previous = {s: signal.signal(s, self._asked) for s in SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        if self._vote is not None and exc[0] is None:
            self._vote.settle()
        try:
            # a stopped run: a copy of its press must not land in the clean-up after, under the handler it had before
            # (unless that is `ctrl_c`, which ignores the copy itself: `run.py` waits once, at the very end)
            if self._previous and exc[0] is not None and self._previous.get(signal.SIGINT) is not ctrl_c:
                wait_out_ctrl_c()
        finally:  # also when a SIGTERM ends the wait
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}

    def _asked(self, signum: int, frame) -> None:
        # the same press delivered twice; under torchrun, a scheduler's SIGTERM to every process of the job and again
        # through torchrun (a single process keeps "a second SIGTERM kills")
        if (signum == signal.SIGINT or self._vote is not None) and _repeated(signum):
            return
        if self.requested is not None or self._at_once:
            raise stop_now(signum)
        self.requested = signum
        if signum == signal.SIGTERM and self._vote is None:  # a second SIGTERM kills at once (a loop stuck in a call
            signal.signal(signal.SIGTERM, signal.SIG_DFL)      # that never returns)
        if not distributed.is_main():  # under torchrun one process says it
            return
        again = "another Ctrl-C, a second or more later," if signum == signal.SIGINT else "a second SIGTERM"
        when = "the step all processes agree on" if self._vote is not None else "this step"
        text = (f"\n{SIGNALS[signum]}: stopping after {when}, with a checkpoint ({again} stops at once, from the "
                "last checkpoint)\n")
        with contextlib.suppress(OSError):  # to the file descriptor: a signal may come in the middle of a write to
            os.write(2, text.encode())      # sys.stderr, which must not be entered again

    def poll(self, save: Callable[[], None], saved: bool = False) -> None:
        """At the end of a step: if a stop was asked for, `save` a checkpoint (unless this step's is `saved`) and
        stop as the signal would have. Under torchrun: when the ranks' last vote asked for a stop (`StopVote`)."""
        requested = self.requested if self._vote is None else self._vote(self.requested or 0) or None
        if requested is None:
            return
        if not saved:
            save()
        raise stop_now(requested)

    @contextlib.contextmanager
    def at_once(self) -> Iterator[None]:
        """A phase a signal stops at once: the checkpoint before it already holds every step."""
        self._at_once += 1
        try:
            yield
        finally:
            self._at_once -= 1
