"""A test helper that stops a run midway, as Ctrl-C would."""


def interrupted_once(fn):
    """`fn`, except that its first call raises KeyboardInterrupt; `.calls` counts the calls."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == 1:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper
