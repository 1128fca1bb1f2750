"""Crafter as a gymnasium environment, its episode statistics file, and the benchmark score.

Crafter (Hafner 2021) speaks the old gym API (`reset() -> obs`, `step -> obs, r, done, info`); this wrapper
gives the gymnasium API, seeds the world exactly as `crafter.Env(seed=s)` does, splits `done` into
terminated (the player died) and truncated (the episode length ran out), and appends one line per finished
episode to a `stats.jsonl` in crafter's own schema, so crafter's analysis scripts read our runs.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import crafter
import gymnasium as gym
import numpy as np
from crafter import constants, engine

from . import ENV_DEFAULTS
from .actions import checked_action
from .errors import UsageError
from .jsonl import read_records

ACHIEVEMENTS: tuple[str, ...] = tuple(sorted(constants.achievements))  # the 22 of the benchmark
ACTIONS: tuple[str, ...] = tuple(constants.actions)  # the 17 actions


class _ChunkObjects(dict):
    """Insertion-ordered stand-in for the `set` of objects crafter keeps per world chunk. Crafter despawns
    `creatures[random.randint(len)]` from that set's iteration order, which for a set of objects follows their
    memory addresses: the same seed and actions played different games from process to process."""

    def add(self, obj) -> None:
        self[obj] = None

    def remove(self, obj) -> None:
        del self[obj]


class _World(engine.World):
    """crafter's world with ordered chunk sets (`_ChunkObjects`), so a seeded game is reproducible."""

    def reset(self, seed=None):
        super().reset(seed)
        self._chunks = collections.defaultdict(_ChunkObjects)


class CrafterEnv(gym.Env):
    """`crafter.Env` with the gymnasium API: image observation `(size, size, 3)` uint8, 17 discrete actions.

    `reset(seed=s)` builds the same world and first frames as a fresh `crafter.Env(seed=s)`, and the same seed and
    actions play the same game in any process (crafter's own may not: `_ChunkObjects`); later resets
    without a seed continue that env's episode sequence (as crafter does). `info` carries `achievements`,
    `inventory` and crafter's unscaled per-step `reward`; `semantic=True` adds crafter's semantic map.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, size: int = 64, area: int = 64, view: int = 9,
                 max_episode_steps: int = ENV_DEFAULTS["max_episode_steps"],
                 reward: bool = True, stats_path: Optional[Union[str, Path]] = None, semantic: bool = False,
                 render_mode: Optional[str] = None):
        if size < 2 * view:  # crafter's renderer fails below 2 pixels per view cell
            raise UsageError(f"crafter size must be >= {2 * view} pixels (2 per view cell), got {size}")
        if max_episode_steps < 1:  # crafter reads a length of 0 as no limit at all
            raise UsageError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self._kwargs = dict(area=(area, area), view=(view, view), size=(size, size), reward=reward,
                            length=max_episode_steps)
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(ACTIONS))
        self.render_mode = render_mode
        self.stats_path = Path(stats_path) if stats_path else None
        self.semantic = semantic
        self._env: Optional[crafter.Env] = None
        self._obs: Optional[np.ndarray] = None
        self._length = 0
        self._return = 0.0
        self._ended = False  # the episode is over: a step needs a reset first

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if seed is not None or self._env is None:
            # A fresh crafter.Env: its world seeds are hash((seed, episode)), so this matches raw crafter.
            world_seed = seed if seed is not None else int(self.np_random.integers(2**31 - 1))
            self._env = crafter.Env(seed=world_seed, **self._kwargs)
            self._env._world.__class__ = _World  # before its first reset: the world's chunks become ordered
        self._obs = self._env.reset()
        self._length, self._return, self._ended = 0, 0.0, False
        return self._obs, {}

    def step(self, action):
        if self._env is None or self._ended:  # crafter would play on past the end, writing its stats line again
            raise gym.error.ResetNeeded(f"{'the episode ended: ' if self._ended else ''}call reset() before step()")
        obs, reward, done, info = self._env.step(checked_action(action, self.action_space.n))
        self._obs = obs
        self._length += 1
        self._return += info["reward"]
        terminated = bool(done and info["discount"] == 0)
        truncated = bool(done and not terminated)
        out = {"achievements": info["achievements"], "inventory": info["inventory"], "reward": info["reward"]}
        if self.semantic:
            out["semantic"] = info["semantic"]
        self._ended = bool(done)
        if done and self.stats_path is not None:
            self._write_stats(info["achievements"])
        return obs, float(reward), terminated, truncated, out

    def _write_stats(self, achievements: dict) -> None:
        record = {"length": self._length, "reward": round(self._return, 1)}
        record.update({f"achievement_{k}": int(v) for k, v in achievements.items()})
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        # One write of one line in append mode: several worker processes can share the file.
        with open(self.stats_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def render(self):
        return None if self._obs is None else self._obs.copy()


def read_stats(path: Union[str, Path]) -> list[dict]:
    """The records of a crafter `stats.jsonl` (a torn last line from a killed writer is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / "stats.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no crafter episode statistics at {path}")
    return read_records(path)


def crafter_score(records_or_path: Union[str, Path, Iterable[dict]]) -> dict[str, Any]:
    """Crafter's benchmark numbers over all episodes: success rate (%) of each achievement, and
    score = exp(mean(ln(1 + rate))) - 1 over the 22 achievements (Hafner 2021). Takes episode records (an
    iterable of the dicts CrafterEnv writes), or the path of their stats.jsonl (or of the folder holding it: a run
    or dataset). Returns score, success_rates {achievement: %}, episodes, mean_return and mean_length."""
    if isinstance(records_or_path, (str, Path)):
        records = read_stats(records_or_path)
    elif isinstance(records_or_path, dict):
        raise UsageError("crafter_score takes the episode records (a list of dicts), not one record: wrap it in a list")
    else:
        records = list(records_or_path)
    if not records:
        raise UsageError("crafter_score needs at least one finished episode")
    if not any(k.startswith("achievement_") for k in records[0]):  # every crafter record lists all 22
        raise UsageError(f"these are not crafter episode records (no achievement_* keys, but {sorted(records[0])}); "
                         "NetHack's go to envs.nethack.nethack_summary")
    unknown = {k[len("achievement_"):] for r in records for k in r if k.startswith("achievement_")} - set(ACHIEVEMENTS)
    if unknown:
        raise UsageError(f"unknown achievements in episode records: {sorted(unknown)}")
    unlocked = np.array([[r.get(f"achievement_{a}", 0) > 0 for a in ACHIEVEMENTS] for r in records], np.float64)
    rates = unlocked.mean(0) * 100  # per achievement, percent of episodes
    score = float(np.exp(np.mean(np.log(1 + rates))) - 1)
    return {"score": score, "success_rates": dict(zip(ACHIEVEMENTS, rates.tolist())), "episodes": len(records),
            "mean_return": float(np.mean([r.get("reward", 0.0) for r in records])),
            "mean_length": float(np.mean([r.get("length", 0) for r in records]))}
