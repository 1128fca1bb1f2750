"""Test helpers that stop a run midway, as Ctrl-C would."""
import signal


def interrupted_once(fn):
    """`fn`, except that its first call raises KeyboardInterrupt; `.calls` counts the calls."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == 1:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def raising_at_call(fn, n: int, error: BaseException):
    """`fn`, except that its `n`-th call raises `error`; `.calls` counts the calls."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == n:
            raise error
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def ctrl_c_in_call(fn, n: int):
    """`fn`, except that its `n`-th call first sends this process SIGINT (a Ctrl-C arriving during it); `.calls`
    counts the calls."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == n:
            signal.raise_signal(signal.SIGINT)
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper
