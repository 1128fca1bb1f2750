"""Episode files: what `run.py collect` writes and what pretraining and the world model read.

A dataset directory holds `meta.json` (env, observation keys, action count) and `episodes/*.npz`, one file
per episode (or per piece of an episode cut by the end of collection), in DreamerV3's step layout: entry t
holds observation t, the action that led to it, the reward received with it, and flags. So `action[0]` and
`reward[0]` are 0, `is_first[0]` is set, and `is_last`/`is_terminal` mark the final entry.
"""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from . import ENV_DEFAULTS
from .atomic import atomic_write
from .errors import DataError

STEP_KEYS = ("action", "reward", "is_first", "is_last", "is_terminal")
STEP_DTYPES = {"action": np.int64, "reward": np.float32, "is_first": bool, "is_last": bool, "is_terminal": bool}


def obs_dict(obs: Any) -> dict[str, np.ndarray]:
    """A single observation as named arrays: an image-only env becomes {"image": obs}."""
    return dict(obs) if isinstance(obs, dict) else {"image": obs}


def _comparable(key: str, value):
    """A meta.json value as datasets must agree on it: `env_kwargs` holds only the options `collect` was given, so
    the games' defaults fill the others (a default given explicitly is the same setting), and the frame size is
    compared through `image_shape` instead."""
    if key == "env_kwargs" and (value is None or isinstance(value, dict)):  # None: a dataset written without them
        return {k: v for k, v in {**ENV_DEFAULTS, **(value or {})}.items() if k != "size"}
    return value


def seed_range(first: int, count: int) -> str:
    """An env-seed range [first, count] as text: `3`, or `3..6`."""
    return f"{first}" if count == 1 else f"{first}..{first + count - 1}"


def next_free_seed(ranges: list) -> int:
    """The first env seed past a dataset's `env_seeds` ranges ([first, count] each)."""
    return max(f + c for f, c in ranges)


def more_episodes_command(root: Union[str, Path]) -> str:
    """The `run.py collect` that adds episodes to a dataset: its env, and the first env seed it does not hold."""
    meta = read_meta(root)
    ranges = meta.get("env_seeds") or []
    seed = f"--seed {next_free_seed(ranges)}" if ranges else "--seed S (a new seed)"
    return f"`run.py collect --env {meta['env']} --out {root} {seed}`"


def _joined_meta(root: Path, meta: dict) -> dict:
    """The meta.json of a dataset that `meta`'s episodes join: a new dataset's, or an existing one's of the same
    env and layout collected from other env seeds (listed as [first, count] ranges: a collection's env i plays
    `seed` + i, over its `num_envs` envs). A run directory or another env's dataset is refused, as is a collection
    whose env seeds overlap one already collected (its envs would replay those worlds)."""
    if (root / "config.yaml").is_file():
        raise DataError(f"{root} is a run directory; write episodes to a dataset directory of their own")
    layout = {k: v for k, v in meta.items() if k not in ("seed", "num_envs")}
    new = [[meta["seed"], meta.get("num_envs", 1)]] if "seed" in meta else []
    path = root / "meta.json"
    if not path.is_file():
        return {**layout, "env_seeds": new} if new else layout
    old = read_meta(root)  # a damaged one is a one-line error
    # datasets from before the ranges were kept list each collection's first seed only
    ranges = old.get("env_seeds") or [[s, 1] for s in old.get("seeds", [old["seed"]] if "seed" in old else [])]
    if "env_seeds" not in old and ranges:
        firsts = ", ".join(str(f) for f, _ in ranges)
        print(f"note: {root} lists only the first env seed of each earlier collection ({firsts}); their other "
              "envs played the seeds after it, which this check cannot see: pick a --seed well above them",
              file=sys.stderr)
    for key in sorted((set(old) | set(layout)) - {"seed", "seeds", "env_seeds"}):
        if _comparable(key, old.get(key)) != _comparable(key, layout.get(key)):
            raise DataError(f"{root} holds episodes with {key}={old.get(key)!r}, not {layout.get(key)!r}: write these "
                            "to another directory")
    for first, count in ranges:
        for seed, n in new:
            if seed < first + count and first < seed + n:
                raise DataError(f"{root} already holds the episodes of env seed {seed_range(first, count)}, which --seed {seed} with {n} "
                                f"envs would play again (env i plays --seed + i): pass --seed "
                                f"{next_free_seed(ranges)} or more to add more")
    return {**layout, "env_seeds": ranges + new}


def step_records(obs: dict, actions, rewards, terms, truncs, first: np.ndarray) -> dict:
    """Every env's step (arrays `n ...`) in the episode layout; a first step has no action, reward or end."""
    later = ~first
    ended = np.logical_or(terms, truncs)
    return {**obs, "action": np.where(later, actions, 0).astype(np.int64),
            "reward": np.where(later, rewards, 0.0).astype(np.float32), "is_first": first.copy(),
            "is_last": ended & later, "is_terminal": np.asarray(terms, bool) & later}


class EpisodeWriter:
    """Accumulates the step streams of several envs and writes each finished episode as one `.npz`.

    Feed it per env: `begin(i, obs)` for a first observation, `step(i, obs, action, reward, terminated,
    truncated)` for the rest; or every env's step at once with `add_steps` (`step_records`, as a replay buffer
    takes them). `flush()` writes unfinished episodes as truncated pieces. meta.json (and the seed it
    lists) is written with the first episode, so a collection stopped before any leaves the dataset as it was.
    """

    def __init__(self, root: Union[str, Path], meta: dict):
        self.root = Path(root)
        self.dir = self.root / "episodes"
        self.meta = _joined_meta(self.root, meta)  # checked now: a wrong directory is refused before any env runs
        self.buffers: dict[int, dict[str, list]] = {}
        held = [episode_index(p) for p in self.dir.glob("*.npz")] if self.dir.is_dir() else []
        self.count = len(held)  # episodes in the dataset
        self.next_index = max(held, default=-1) + 1  # past every file there: a removed episode frees no number
        self.frames = 0

    def begin(self, env: int, obs: Any) -> None:
        if env in self.buffers and len(self.buffers[env]["action"]) > 1:
            self._write(env, cut=True)
        buf = {k: [v] for k, v in obs_dict(obs).items()}
        buf.update(action=[0], reward=[0.0], is_first=[True], is_last=[False], is_terminal=[False])
        self.buffers[env] = buf

    def step(self, env: int, obs: Any, action: int, reward: float, terminated: bool, truncated: bool) -> None:
        buf = self.buffers.get(env)
        if not buf:
            raise RuntimeError(f"env {env}: step() before begin()")
        for k, v in obs_dict(obs).items():
            buf[k].append(v)
        buf["action"].append(int(action))
        buf["reward"].append(float(reward))
        buf["is_first"].append(False)
        buf["is_last"].append(bool(terminated or truncated))
        buf["is_terminal"].append(bool(terminated))
        if terminated or truncated:
            self._write(env)

    def add_steps(self, steps: dict, envs) -> None:
        """One step of each env in `envs`, arrays `n ...` in the episode layout (`step_records`). Each env's row is
        copied: a view would keep the whole step's `n ...` arrays alive for as long as that env's episode runs."""
        for row, env in enumerate(envs):
            obs = {k: v[row].copy() for k, v in steps.items() if k not in STEP_KEYS}
            if steps["is_first"][row]:
                self.begin(env, obs)
            else:
                terminated = bool(steps["is_terminal"][row])
                self.step(env, obs, steps["action"][row], steps["reward"][row], terminated,
                          bool(steps["is_last"][row]) and not terminated)

    def _write(self, env: int, cut: bool = False) -> None:
        buf = self.buffers.pop(env)
        if cut:  # a step interrupted while it was appended (Ctrl-C during step()) is dropped whole
            steps = min(len(v) for v in buf.values())
            buf = {k: v[:steps] for k, v in buf.items()}
            buf["is_last"][-1] = True
        arrays = {k: np.asarray(v, dtype=STEP_DTYPES.get(k)) for k, v in buf.items()}
        length = len(arrays["action"])
        if self.meta is not None:  # the first episode: the dataset's meta.json with it
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.root / "meta.json", lambda f: f.write(json.dumps(self.meta, indent=2).encode()))
            self.meta = None
        atomic_write(self.dir / f"{self.next_index:06d}-{length}.npz", lambda f: np.savez_compressed(f, **arrays))
        self.count += 1
        self.next_index += 1
        self.frames += length

    @property
    def stored(self) -> int:
        """Frames written, and those `flush` would write now (not an episode's lone first frame)."""
        return self.frames + sum(len(b["action"]) for b in self.buffers.values() if len(b["action"]) > 1)

    def flush(self) -> None:
        """Write every unfinished episode (ending it as truncated: `is_last` without `is_terminal`)."""
        for env in [e for e, b in self.buffers.items() if b and len(b["action"]) > 1]:
            self._write(env, cut=True)
        self.buffers.clear()


def _read_from(root: Path) -> str:
    """Where a relative path that does not exist was looked for, to say beside it."""
    return "" if root.is_absolute() or root.exists() else f" (a relative path, read from {Path.cwd()})"


def check_recorded_root(root: Union[str, Path], run_dir: Union[str, Path], fix: str) -> None:
    """The data a run recorded (data.root) must still be there: if not, one line naming it and `fix`."""
    if not Path(root).exists():
        raise DataError(f"data.root={root}{_read_from(Path(root))}, the data {run_dir} trained on, does not exist; "
                        f"if it moved, {fix}")


def read_meta(root: Union[str, Path]) -> dict:
    """An episode dataset's meta.json (env, num_actions, obs_keys, image_shape, seeds), or a one-line DataError."""
    root = Path(root)
    path = root / "meta.json"
    if not path.is_file():
        if (root / "config.yaml").is_file():
            raise DataError(f"{root} is a run directory, not an episode dataset: pass a dataset of `run.py collect`")
        if (root / "scenes").is_dir() or (root / "CLEVR_v1.0").is_dir():
            raise DataError(f"{root} is a CLEVR root, not an episode dataset: pretrain on it with data.source=clevr "
                            f"data.root={root} (--data takes game frames from `run.py collect`)")
        raise DataError(f"{root} is not an episode dataset (no meta.json){_read_from(root)}; make one with "
                        "`run.py collect`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is damaged ({e}); collect the dataset again") from None
    if not isinstance(meta, dict) or "env" not in meta:
        raise DataError(f"{path} does not describe an episode dataset (no 'env'); collect the dataset again")
    return meta


def _name_numbers(path: Path) -> tuple[int, int]:
    """(index, steps) from an episode file's name, `<index>-<steps>.npz` as `EpisodeWriter` names them."""
    try:
        index, steps = path.stem.split("-")
        return int(index), int(steps)
    except ValueError:
        raise DataError(f"{path}: not an episode file name of `run.py collect` (<index>-<steps>.npz); move other "
                        "files out of the episodes directory") from None


def episode_index(path: Path) -> int:
    """An episode file's number: its place in the order the dataset's episodes were written."""
    return _name_numbers(path)[0]


def episode_length(path: Path) -> int:
    """The step count in an episode file's name."""
    return _name_numbers(path)[1]


def episode_paths(root: Union[str, Path]) -> list[Path]:
    """A dataset's episode files in the order they were written (by number: 1000000 comes after 999999)."""
    read_meta(root)
    paths = sorted((Path(root) / "episodes").glob("*.npz"), key=lambda p: (episode_index(p), p.name))
    if not paths:
        raise DataError(f"{root}/episodes holds no .npz episodes; collect some with `run.py collect`")
    return paths


def held_out_episodes(lengths: list[int], fraction: float) -> int:
    """How many of the last episodes (of these step counts, in order) are held out for evaluation: those that hold
    `fraction` of the steps, at least one and never all (so none of a single episode). World-model training and pretraining on the frames split a
    dataset alike, so a pretrained encoder has not seen the frames a world model is evaluated on."""
    held, n = 0, 0
    while n < len(lengths) - 1 and (n == 0 or held < fraction * sum(lengths)):
        n += 1
        held += lengths[-n]
    return n


def load_episode(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """One episode's arrays, one row per observation: image `t h w 3` uint8, action, reward, is_first, is_last,
    is_terminal (and the env's other observation keys)."""
    try:
        with np.load(path) as f:
            ep = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"unreadable episode file {path}: {e}") from None
    missing = [k for k in ("image", *STEP_KEYS) if k not in ep]
    if missing:
        raise DataError(f"episode file {path} lacks {missing}")
    return ep


def iter_episodes(root: Union[str, Path], keys: Optional[tuple[str, ...]] = None) -> Iterator[dict]:
    """`load_episode` of each episode of a dataset, in order (only `keys`, if given)."""
    for path in episode_paths(root):
        ep = load_episode(path)
        yield {k: ep[k] for k in keys} if keys else ep


def load_frames(root: Union[str, Path]) -> tuple[np.ndarray, list[int]]:
    """All frames of a dataset, in episode-file order (`n h w 3` uint8), and each episode's frame count."""
    frames = []
    for path in episode_paths(root):  # listed once: episodes a running `collect` adds meanwhile are left out
        image = load_episode(path)["image"]
        if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise DataError(f"{path}: frames must be uint8 (n, h, w, 3), got {image.dtype} {image.shape}")
        if frames and image.shape[1:] != frames[0].shape[1:]:
            raise DataError(f"{path} holds {image.shape[1]}x{image.shape[2]} frames, the episodes before it "
                            f"{frames[0].shape[1]}x{frames[0].shape[2]}: a dataset's frames must have one size "
                            "(collect each size into its own dataset)")
        if len(image) != episode_length(path):
            raise DataError(f"{path} holds {len(image)} frames, its name {episode_length(path)}: a file renamed or "
                            "replaced by hand; remove it")
        frames.append(image)
    return np.concatenate(frames), [len(f) for f in frames]
