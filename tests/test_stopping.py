"""Ctrl-C and SIGTERM inside a training loop: the first asks for a stop after the current step, with a checkpoint;
a second, or one during an evaluation, stops at once (`world_model.stopping`)."""
import signal

import pytest

from world_model.stopping import StepStops, Terminated


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
    assert "\nCtrl-C: stopping after this step, with a checkpoint (Ctrl-C again stops at once, from the last " \
        "checkpoint)\n" in capfd.readouterr().err  # written to the descriptor, not through sys.stderr
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]  # restored on the way out


def test_a_step_that_already_saved_is_not_saved_twice():
    with StepStops() as stops:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            stops.poll(lambda: pytest.fail("saved twice"), saved=True)


def test_a_second_signal_and_one_during_an_evaluation_stop_at_once():
    with StepStops() as stops:
        with stops.at_once(), pytest.raises(KeyboardInterrupt):  # a checkpoint came just before: nothing to wait for
            signal.raise_signal(signal.SIGINT)
        assert stops.requested is None
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # stuck in a long step: the second one does not wait for it
            signal.raise_signal(signal.SIGINT)


def test_sigterm_stops_as_terminated_and_a_second_one_kills(handlers):
    with StepStops() as stops:
        signal.raise_signal(signal.SIGTERM)
        assert stops.requested == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a scheduler's second SIGTERM is not deferred
        with pytest.raises(Terminated):
            stops.poll(lambda: None)
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]


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
