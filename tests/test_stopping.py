"""Ctrl-C and SIGTERM inside a training loop: the first asks for a stop after the current step, with a checkpoint;
a second, or one during an evaluation, stops at once (`world_model.stopping`)."""
import contextlib
import signal

import pytest

from world_model import stopping
from world_model.stopping import StepStops, Terminated


class Clock:
    """The stops' clock, moved by hand (`.now += s`). A wait on the way out moves it and is recorded in `.waits`; a
    signal due within it (`.copy_after`: seconds into the next wait; `.signum`, a Ctrl-C copy as from a wrapper by
    default) arrives then."""

    def __init__(self):
        self.now, self.waits, self.copy_after, self.signum = 100.0, [], None, signal.SIGINT

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.copy_after is not None and self.copy_after < seconds:
            self.now += self.copy_after
            seconds -= self.copy_after
            self.copy_after = None
            signal.raise_signal(self.signum)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(stopping, "monotonic", lambda: c.now)
    monkeypatch.setattr(stopping, "sleep", c.sleep)
    return c


@pytest.fixture(autouse=True)
def handlers(ctrl_c):
    """Each test starts with Python's own Ctrl-C handling (`ctrl_c`, which restores what it found after: a failing
    test must not leave Ctrl-C deferred); the handlers it starts with."""
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def test_ctrl_c_asks_for_a_stop_that_the_next_poll_saves_and_makes(handlers, capfd):
    saves = []
    with StepStops() as stops:
        stops.poll(lambda: saves.append("early"))  # nothing asked yet: the loop goes on
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt here: the step in progress finishes
        assert stops.requested == signal.SIGINT and saves == []
        with pytest.raises(KeyboardInterrupt) as stopped:
            stops.poll(lambda: saves.append("checkpoint"))
    assert type(stopped.value) is KeyboardInterrupt and saves == ["checkpoint"]
    assert "\nCtrl-C: stopping after this step, with a checkpoint (another Ctrl-C, a second or more later, stops " \
        "at once, from the last checkpoint)\n" in capfd.readouterr().err  # written to the descriptor, not through sys.stderr
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]  # restored on the way out


def test_a_step_that_already_saved_is_not_saved_twice():
    with StepStops() as stops:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            stops.poll(lambda: pytest.fail("saved twice"), saved=True)


def test_a_second_signal_and_one_during_an_evaluation_stop_at_once(clock):
    with StepStops() as stops:
        with stops.at_once(), pytest.raises(KeyboardInterrupt):  # a checkpoint came just before: nothing to wait for
            signal.raise_signal(signal.SIGINT)
        assert stops.requested is None
        clock.now += 2.0
        signal.raise_signal(signal.SIGINT)
        clock.now += 2.0
        with pytest.raises(KeyboardInterrupt):  # stuck in a long step: the second one does not wait for it
            signal.raise_signal(signal.SIGINT)


def test_a_ctrl_c_delivered_twice_is_one_press(clock):
    """A wrapper that forwards the Ctrl-C its process group got too (uv run, after up to 0.2 s) delivers one press
    twice: the copy, within SAME_PRESS_S, neither stops the run at once nor counts as a new press; a press after
    that stops at once."""
    with StepStops() as stops:
        signal.raise_signal(signal.SIGINT)
        clock.now += 0.2
        signal.raise_signal(signal.SIGINT)  # the same press, forwarded
        assert stops.requested == signal.SIGINT
        clock.now += stopping.SAME_PRESS_S
        with pytest.raises(KeyboardInterrupt):  # a second press
            signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("where", ["step", "evaluation"])
def test_a_stopped_run_waits_out_the_copy_before_handing_ctrl_c_back(where, clock, handlers):
    """A run stopped at once (in an evaluation), or by a step and checkpoint shorter than 0.2 s, would hand Ctrl-C
    back to Python before the wrapper's copy came: a KeyboardInterrupt in the run's clean-up (env workers, the
    run's claim). The way out waits for it, and the copy arriving then is ignored."""
    clock.copy_after = 0.2
    with pytest.raises(KeyboardInterrupt), StepStops() as stops:
        with stops.at_once() if where == "evaluation" else contextlib.nullcontext():
            signal.raise_signal(signal.SIGINT)  # in an evaluation: it stops here
            clock.now += 0.3
        stops.poll(lambda: None)
    waited = stopping.SAME_PRESS_S - (0.3 if where == "step" else 0)
    assert clock.waits == [pytest.approx(waited)] and clock.copy_after is None  # the copy came, in the wait
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]
    clock.now += 5
    with pytest.raises(KeyboardInterrupt), StepStops() as stops:  # SIGTERM: no copies to wait for
        signal.raise_signal(signal.SIGTERM)
        stops.poll(lambda: None)
    assert len(clock.waits) == 1
    clock.now += 5
    clock.copy_after, clock.signum = 0.1, signal.SIGTERM  # a SIGTERM ends the wait: the handlers are handed back
    with pytest.raises(Terminated), StepStops() as stops:
        signal.raise_signal(signal.SIGINT)
        stops.poll(lambda: None)
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]


def test_run_py_takes_a_copy_during_its_clean_up_for_the_same_press(clock, monkeypatch, capsys):
    """Outside the training loops too (loading, evaluating after training, any command): one press is one
    KeyboardInterrupt, and the command waits out its copy before it leaves."""
    import run

    cleaned = []

    def interrupted(args):
        try:
            signal.raise_signal(signal.SIGINT)  # the terminal's
        finally:
            clock.now += 0.2
            signal.raise_signal(signal.SIGINT)  # the wrapper's copy, in the clean-up: ignored
            cleaned.append(True)
    monkeypatch.setattr(run, "cmd_config", interrupted)
    assert run.main(["config"]) == 130 and cleaned == [True]
    assert "interrupted" in capsys.readouterr().err
    assert clock.waits == [pytest.approx(stopping.SAME_PRESS_S - 0.2)]


def test_sigterm_stops_as_terminated_and_a_second_one_kills(handlers):
    with StepStops() as stops:
        signal.raise_signal(signal.SIGTERM)
        assert stops.requested == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a scheduler's second SIGTERM is not deferred
        with pytest.raises(Terminated):
            stops.poll(lambda: None)
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]


class Votes:
    """`distributed.StopVote` stand-in for a torchrun process: the flags this rank sent, and the vote it reads."""

    def __init__(self):
        self.sent, self.agreed = [], 0

    def __call__(self, flag: int) -> int:
        self.sent.append(flag)
        return self.agreed

    def settle(self) -> None:
        pass


def test_under_torchrun_the_stop_waits_for_the_vote_and_a_schedulers_double_sigterm_counts_once(clock, monkeypatch,
                                                                                                capfd):
    """Under torchrun a stop waits for the processes' vote, then saves and stops at the same poll on all; a
    scheduler's SIGTERM to every process of the job, delivered again by torchrun, counts once; one a second or more
    later stops at once."""
    from world_model import distributed

    votes = Votes()
    monkeypatch.setattr(distributed, "can_vote", lambda: True)
    monkeypatch.setattr(distributed, "StopVote", lambda: votes)
    saves = []
    with StepStops() as stops:
        signal.raise_signal(signal.SIGTERM)
        clock.now += 0.3
        signal.raise_signal(signal.SIGTERM)  # the copy through torchrun: not a second one
        stops.poll(lambda: saves.append("too early"))  # this rank asks; the others have not yet
        assert votes.sent == [signal.SIGTERM] and saves == []
        votes.agreed = signal.SIGTERM
        with pytest.raises(Terminated):
            stops.poll(lambda: saves.append("checkpoint"))
    assert saves == ["checkpoint"]
    assert "SIGTERM: stopping after the step all processes agree on, with a checkpoint" in capfd.readouterr().err
    clock.now += 1.5  # a new SIGTERM, not a copy of the last
    with StepStops():
        signal.raise_signal(signal.SIGTERM)
        clock.now += 1.5
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)


def test_handlers_are_restored_when_the_loop_fails_and_left_alone_when_not_deferring(handlers):
    with pytest.raises(RuntimeError), StepStops():
        raise RuntimeError("a failing step")
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]
    with StepStops(defer=False) as stops:  # several torchrun processes: each stops at once, as before
        assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        stops.poll(lambda: pytest.fail("nothing was asked"))


def test_a_signal_the_shell_ignores_stays_ignored():
    """`cmd &` in a script starts the command with Ctrl-C ignored: the loop does not take it back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StepStops() as stops:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
        assert stops.requested is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
