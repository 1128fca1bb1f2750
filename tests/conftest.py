"""Tests marked `nethack` need the `[nethack]` extra (nle): without it they are skipped, not failed."""
import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("nle") is not None:
        return
    skip = pytest.mark.skip(reason='NetHack is the [nethack] extra: pip install -e ".[nethack]"')
    for item in items:
        if item.get_closest_marker("nethack"):
            item.add_marker(skip)
