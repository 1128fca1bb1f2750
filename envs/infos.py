"""Vector-env infos between worker processes and the parent: batched per worker, packed for the pipe, merged.

Each worker batches its envs' info dicts as gymnasium's ``VectorEnv._add_info`` does (``InfoBatcher``). The
result goes through the pipe packed (``InfoPacker``): the numeric leaves stacked into one array per dtype and
trailing shape, the ``_key`` masks into one bool array, and the layout (which leaf is which row) only when it
changed since the worker's last message. Unpickling a few arrays costs the parent far less than a nested dict of
dozens (Crafter's achievements and inventory: 80 arrays per worker per step). When every worker sends the same
layout the parent fills one full-width array per group (``merge_packed``); otherwise it merges dict by dict
(``merge_infos``), with the same result.
"""
from __future__ import annotations

from typing import Optional

import gymnasium
import numpy as np

Layout = tuple  # (leaves: ((path, group or None, row), ...), groups: ((dtype str, trailing shape), ...))


class InfoBatcher:
    """gymnasium's per-env info batching (``VectorEnv._add_info``) over a worker's ``num_envs`` envs."""

    _add_info = gymnasium.vector.VectorEnv._add_info

    def __init__(self, num_envs: int):
        self.num_envs = num_envs


def merge_infos(infos: dict, part: dict, sl: slice, num_envs: int) -> dict:
    """Place a worker's vector infos (its envs' slice `sl`) into the vector infos of all `num_envs` envs: what
    ``VectorEnv._add_info`` would give for each of those envs in turn (arrays typed by the first env that has
    the key, a ``_key`` mask beside each key, nested dicts merged the same way)."""
    masks = _mask_keys(part)
    for key, value in part.items():
        if key in masks:
            continue  # a mask, merged with its key
        if isinstance(value, dict):
            infos[key] = merge_infos(infos.get(key, {}), value, sl, num_envs)
        else:
            if key not in infos:
                infos[key] = (np.full(num_envs, None, dtype=object) if value.dtype == object
                              else np.zeros((num_envs, *value.shape[1:]), dtype=value.dtype))
            infos[key][sl] = value
        infos.setdefault(f"_{key}", np.zeros(num_envs, dtype=np.bool_))[sl] = part[f"_{key}"]
    return infos


def _mask_keys(part: dict) -> set:
    """The `_key` masks among the keys of batched infos (keys may be any hashable, as in gymnasium)."""
    return {f"_{key}" for key in part} & set(part)


def _leaves(part: dict, path: tuple, out: list) -> bool:
    """Append (path, value or None for a nested dict, mask) for every key of `part`; False at an object array."""
    masks = _mask_keys(part)
    for key, value in part.items():
        if key in masks:
            continue
        if isinstance(value, dict):
            if not _leaves(value, (*path, key), out):
                return False
            value = None
        elif value.dtype == object:
            return False
        out.append(((*path, key), value, part[f"_{key}"]))
    return True


class InfoPacker:
    """A worker's side: its batched infos as ("packed", layout or None when unchanged, groups, masks), or
    ("dict", infos) when a leaf is an object array (strings, final observations)."""

    def __init__(self):
        self.sent: Optional[Layout] = None

    def pack(self, infos: dict) -> tuple:
        leaves: list = []
        if not infos or not _leaves(infos, (), leaves):
            return ("dict", infos)
        specs, groups, index, leaf_specs = [], [], {}, []
        for path, value, _ in leaves:
            if value is None:
                leaf_specs.append((path, None, 0))
                continue
            key = (value.dtype.str, value.shape[1:])
            if key not in index:
                index[key] = len(specs)
                specs.append(key)
                groups.append([])
            g = index[key]
            leaf_specs.append((path, g, len(groups[g])))
            groups[g].append(value)
        layout = (tuple(leaf_specs), tuple(specs))
        changed = layout != self.sent
        self.sent = layout
        return ("packed", layout if changed else None, [np.stack(v) for v in groups],
                np.stack([mask for _, _, mask in leaves]))


def unpack(layout: Layout, groups: list, masks: np.ndarray) -> dict:
    """Packed infos back to the nested dict of arrays (views into `groups` and `masks`)."""
    out: dict = {}
    for row, (path, g, i) in enumerate(layout[0]):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = node.get(path[-1], {}) if g is None else groups[g][i]
        node[f"_{path[-1]}"] = masks[row]
    return out


def record_layout(layouts: dict[int, Layout], w: int, msg: tuple) -> None:
    """The parent's side of InfoPacker.sent: call on every reply as it arrives (before anything may raise), so
    that the worker's and the parent's ideas of its last layout never part."""
    if msg[0] == "packed" and msg[1] is not None:
        layouts[w] = msg[1]


def merge_packed(parts: dict[int, tuple], layouts: dict[int, Layout], slices: dict[int, slice],
                 num_envs: int) -> dict:
    """The vector infos of all envs from each replying worker's packed message (`parts`: worker -> message;
    `layouts`: each worker's last layout, kept by record_layout; `slices`: its envs). Envs of workers absent from
    `parts` get zeros and False masks, as with `merge_infos`."""
    resolved = {w: layouts[w] if msg[0] == "packed" else None for w, msg in parts.items()}
    first = next(iter(resolved.values()), None)
    if first is None or any(layout != first for layout in resolved.values()):
        infos: dict = {}
        for w, msg in parts.items():
            part = msg[1] if msg[0] == "dict" else unpack(resolved[w], msg[2], msg[3])
            infos = merge_infos(infos, part, slices[w], num_envs)
        return infos
    _, _, some_groups, some_masks = next(iter(parts.values()))  # every worker's arrays have these shapes but envs
    groups = [np.zeros((g.shape[0], num_envs, *g.shape[2:]), dtype=g.dtype) for g in some_groups]
    masks = np.zeros((some_masks.shape[0], num_envs), dtype=np.bool_)
    for w, (_, _, part_groups, part_masks) in parts.items():
        sl = slices[w]
        for full, part in zip(groups, part_groups):
            full[:, sl] = part
        masks[:, sl] = part_masks
    return unpack(first, groups, masks)
