"""Collect episodes from Crafter or NetHack with vectorized workers and write them as an episode dataset.

The policy here is uniform random (the data for pretraining slot encoders and world models before any
agent exists). `Collector`, which does the stepping, serves the agent's loop too: there it writes the current
policy's steps into the replay buffer rather than episode files.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import time
from pathlib import Path
from typing import Iterable, Optional

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator
import numpy as np
from tqdm import tqdm

from .atomic import check_folder
from .episodes import EpisodeWriter, obs_dict, step_records
from .errors import UsageError
from .vector import make_vector_env

ENV_IDS = {"crafter": "slotworld/Crafter-v0", "nethack": "slotworld/NetHack-v0"}


class Collector:
    """Vector env -> a sink of steps (a replay buffer, an `EpisodeWriter`): steps the envs and hands every env's
    step on in the episode layout (`step_records`), keeping the NEXT_STEP autoreset bookkeeping (after an end
    comes a first observation). `obs` is the current observation, `first[i]` says it starts an episode,
    `episodes` counts the episodes finished here. `keys`: the observation keys to keep (default all)."""

    def __init__(self, venv, sink, keys: Optional[Iterable[str]] = None):
        self.venv, self.sink, self.n = venv, sink, venv.num_envs
        self.keys = None if keys is None else set(keys)
        self.episodes = 0

    def _kept(self, obs) -> dict:
        obs = obs_dict(obs)
        return obs if self.keys is None else {k: v for k, v in obs.items() if k in self.keys}

    def reset(self, seed: int) -> None:
        self.obs = self._kept(self.venv.reset(seed=seed)[0])
        self.first = np.ones(self.n, bool)
        none = np.zeros(self.n)
        self.sink.add_steps(step_records(self.obs, none, none, none, none, self.first), range(self.n))
        self.resets = np.zeros(self.n, bool)  # the venv resets these envs on the next step

    def step(self, actions: np.ndarray) -> None:
        raw, rewards, terms, truncs, infos = self.venv.step(actions)
        self.obs = self._kept(raw)
        self.first, self.resets = self.resets, np.logical_or(terms, truncs)
        steps = step_records(self.obs, actions, rewards, terms, truncs, self.first)
        # A restarted worker's envs answer with their last frames, truncated (`ResilientVectorEnv`): no game step
        # (the action went unplayed), so nothing of it is stored. An episode it cut short ends at its last real step
        # (a sink closes an open episode when the env's next first step comes), and the next step is a first one.
        restarted = infos.get("_worker_restarted")  # only in a step some worker restarted in
        kept = None if restarted is None else ~np.asarray(restarted, bool)
        if kept is None or kept.all():
            self.sink.add_steps(steps, range(self.n))
        elif kept.any():
            self.sink.add_steps({k: v[kept] for k, v in steps.items()}, np.flatnonzero(kept).tolist())
        self.episodes += int((self.resets & ~self.first).sum())


def make_env(name: str, **kwargs) -> gym.Env:
    """`crafter` or `nethack` (kwargs go to the env class); module-level, so worker processes can pickle it."""
    import envs  # noqa: F401  (registers the ids inside a spawned worker)

    if name not in ENV_IDS:
        raise UsageError(f"unknown env {name!r}; choose one of {sorted(ENV_IDS)}")
    # The registered entry point, called directly: gym.make would take `max_episode_steps` for its own
    # TimeLimit wrapper instead of passing it to the env.
    return load_env_creator(gym.spec(ENV_IDS[name]).entry_point)(**kwargs)


def env_fn(name: str, **kwargs):
    """A picklable zero-argument constructor for vector-env workers. The env's module is imported here, so a game
    that is not installed is one error in this process rather than a failure in each worker."""
    if name not in ENV_IDS:
        raise UsageError(f"unknown env {name!r}; choose one of {sorted(ENV_IDS)}")
    load_env_creator(gym.spec(ENV_IDS[name]).entry_point)
    return functools.partial(make_env, name, **kwargs)


def collect(env: str, frames: int, out: str, num_envs: int = 1, envs_per_worker: int = 1, seed: int = 0,
            env_kwargs: Optional[dict] = None, asynchronous: bool = True, progress: bool = True) -> dict:
    """Run a uniform random policy until at least `frames` observations are stored in `out` (every env steps until the
    step that reaches it); returns counts and speed: frames, episodes (this call's), dataset_episodes and the rest of
    the dict `run.py collect` prints. With `asynchronous` (env worker processes) a calling script needs
    `if __name__ == "__main__":` around its top level (see `envs.vector.make_vector_env`).

    Episodes end as the env ends them (terminated/truncated, or truncated by a crashed worker); episodes
    still running when the budget is reached are written as truncated pieces.
    """
    if frames <= num_envs:  # the envs' first frames alone would reach it: no step would be played
        raise UsageError(f"--frames={frames} is no more than the {num_envs} envs collecting (a first frame each): ask "
                         f"for more than {num_envs}, or fewer --workers / --envs-per-worker")
    out_path = check_folder(out, "--out")
    with _only_collect(out_path):
        return _collect(env, frames, out_path, num_envs, envs_per_worker, seed, env_kwargs, asynchronous, progress)


@contextlib.contextmanager
def _only_collect(root: Path):
    """Hold a lock on `root` (its `.collect.lock`, released by the system if this process dies) while collecting:
    a second collect into the same dataset would number its episodes alike and write meta.json over this one's."""
    made = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / ".collect.lock"
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another `run.py collect` is writing into {root}: wait for it to finish, or collect "
                             "into another --out") from None
        try:
            yield
        finally:
            if made and root.is_dir() and [p.name for p in root.iterdir()] == [lock.name]:  # nothing written:
                lock.unlink()  # leave no folder (unless something else removed it already)
                root.rmdir()


def _collect(env: str, frames: int, out_path: Path, num_envs: int, envs_per_worker: int, seed: int,
             env_kwargs: Optional[dict], asynchronous: bool, progress: bool) -> dict:
    env_kwargs = dict(env_kwargs or {})
    env_kwargs.setdefault("stats_path", str(out_path / "stats.jsonl"))
    venv = make_vector_env(env_fn(env, **env_kwargs), num_envs, envs_per_worker=envs_per_worker,
                           asynchronous=asynchronous)
    try:
        space = venv.single_observation_space
        keys = list(space.spaces) if isinstance(space, gym.spaces.Dict) else ["image"]
        meta = {"env": env, "env_kwargs": {k: v for k, v in env_kwargs.items() if k != "stats_path"},
                "num_actions": int(venv.single_action_space.n), "obs_keys": keys, "seed": seed, "num_envs": num_envs,
                "image_shape": list((space["image"] if isinstance(space, gym.spaces.Dict) else space).shape)}
        writer = EpisodeWriter(out_path, meta)
        held_before = writer.count  # episodes the dataset held before this call
        rng = np.random.default_rng(seed)
        collector = Collector(venv, writer)
        collector.reset(seed)
        steps = 0
        start = time.perf_counter()
        bar = tqdm(total=frames, desc=f"collect {env}", unit="frame", disable=not progress)
        try:
            while writer.stored < frames:  # an episode's lone first frame at the end is not stored: not counted
                collector.step(rng.integers(venv.single_action_space.n, size=num_envs))
                steps += 1
                bar.update(min(writer.stored, frames) - bar.n)
        finally:  # also when stopped (Ctrl-C, SIGTERM): what was collected is kept, unfinished episodes as truncated
            writer.flush()
        bar.close()
        seconds = time.perf_counter() - start
        return {"frames": writer.frames, "episodes": writer.count - held_before, "dataset_episodes": writer.count,
                "seconds": round(seconds, 2),
                "env_steps_per_s": round(steps * num_envs / max(seconds, 1e-9), 1),
                "restarts": getattr(venv, "restarts", 0), "out": str(out_path)}
    finally:
        venv.close()
