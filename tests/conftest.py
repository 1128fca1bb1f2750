"""Tests marked `nethack` need the `[nethack]` extra (nle): without it they are skipped, not failed. The
`ctrl_c` fixture gives a test Python's own Ctrl-C handling."""
import importlib.util
import signal

import pytest


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("nle") is not None:
        return
    skip = pytest.mark.skip(reason='NetHack is the [nethack] extra: pip install -e ".[nethack]"')
    for item in items:
        if item.get_closest_marker("nethack"):
            item.add_marker(skip)


@pytest.fixture
def ctrl_c():
    """SIGINT raising KeyboardInterrupt, as in a terminal, for the test, whatever the suite was started with (a
    shell starting it in the background, as CI scripts may, leaves SIGINT ignored); the handlers found after."""
    from world_model import stopping

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stopping._last_signal.clear()  # no earlier test's press: this test's first Ctrl-C is no copy of it
    yield
    for s, handler in before.items():
        signal.signal(s, handler)
