"""The games' shared check of an action, on every env step (so cheaper than gymnasium's `Discrete.contains`)."""
from __future__ import annotations

import operator


def checked_action(action, n: int) -> int:
    """`action` (an int, numpy integer or 0-d integer array) as an int in [0, n), or a one-line ValueError: a caller's
    bug, which a vector env would otherwise take for a crashed worker."""
    try:
        a = operator.index(action)
    except TypeError:
        a = None
    if a is None or not 0 <= a < n:
        raise ValueError(f"action {action!r} is not in the action space Discrete({n})")
    return a
