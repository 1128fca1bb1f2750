"""NetHack (NLE) as pixels: the real 16x16 NetHack tileset cropped around the player, plus bottom-line stats.

Why: the object-centric world models take images; NLE gives symbolic glyphs.  Each step turns the
(21, 79) glyph map into a crop x crop window of tiles centred on the player with one gather over a
precomputed glyph -> tile table (no per-cell drawing), then resizes it to ``size``.

NLE 1.3.0 details this module relies on:

* Tiles: there is no module-level ``get_tileset``.  ``nle.nethack.Nethack.setup_tiles()`` loads the
  tileset and ``get_tileset(buf)`` fills a uint8 sheet ``(rows*16, cols*16, 3)`` with tiles in row-major
  order (1082 tiles); ``glyph2tile`` (int16, length MAX_GLYPH) maps a glyph to its tile.  NLE's own
  ``render_mode="pixel"`` draws with exactly these (a test checks that against ``draw_frame``).
* Padding: cells outside the map use the "stone" glyph (GLYPH_CMAP_OFF + S_stone), the all-black tile
  NetHack shows for unexplored rock.  NO_GLYPH (= MAX_GLYPH) gets a black tile too.
* Seeding: NLE's ``reset(seed=...)`` does not seed NetHack.  Every reset here draws (core, disp) from
  ``self.np_random`` and sets them with reseed=False, so reset(seed=s) repeats a game exactly and
  unseeded resets stay random.  NetHackChallenge blocks seeding (a competition rule) by replacing the
  instance's seed methods; we call the class method directly so its seeded resets are reproducible too.
  ``fix_moon_phase=True`` keeps the date (full moon, Friday 13th, night) out of the game.
* Episode end: NLE reports its step limit as done (end_status ABORTED) and after the game is over its
  glyphs and blstats are zero.  Here an ABORTED end is ``truncated`` (not terminated).  NLE then quits the game
  inside ``step`` (``_quit_game``), on the arrays that step returns, and a death's game-over screens are skipped
  there too (``_perform_known_steps``, which ``step`` calls on the state its action led to, before any message is
  acknowledged: at game over, and on every step unless the task allows all modes, as NetHackChallenge does;
  ``_quit_game`` calls it first as well).  That call's instance attribute is wrapped to keep the state it starts
  from, so the final observation of either end is the state the last action led to (a death's: its last hit, on the
  bottom line as NetHack last drew it, which may not show 0 hit points).
* Cause of death: NLE does not report it, but NetHack appends each finished game to the ``xlogfile`` in the
  instance's private HACKDIR (``Nethack._vardir``), with ``death=killed by a jackal`` and, at times,
  ``while=fainted from lack of food``.  The episode summary reads the entry its game added.
"""
from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import gymnasium
import numpy as np

from .errors import UsageError

try:
    from nle import nethack
    from nle.env import tasks
except ImportError as e:
    raise UsageError(f"NetHack needs the nle package ({e}): pip install -e \".[nethack]\" in the project, or "
                     "pip install nle==1.3.0") from None

from . import ENV_DEFAULTS, STATUS_LEVELS, STATUS_NAMES
from .actions import checked_action
from .jsonl import read_records

TASKS = {"score": tasks.NetHackScore, "challenge": tasks.NetHackChallenge}
TILE = nethack.TILE_SHAPE[0]  # 16 px
MAP_SHAPE = nethack.DUNGEON_SHAPE  # (21, 79)
PAD_GLYPH = nethack.GLYPH_CMAP_OFF  # S_stone: black tile
N_STATS = nethack.NLE_BLSTATS_SIZE  # 27
DEATHS_LISTED = 5  # causes of death a summary counts, the most frequent first
STATUS_VARS = len(STATUS_NAMES["nethack"])  # hit points, energy, hunger, encumbrance, depth, level, armour class
_TOP = STATUS_LEVELS - 1
_HP, _HP_MAX, _ENERGY, _ENERGY_MAX = nethack.NLE_BL_HP, nethack.NLE_BL_HPMAX, nethack.NLE_BL_ENE, nethack.NLE_BL_ENEMAX
_HUNGER, _CAP, _DEPTH, _XP, _AC = (nethack.NLE_BL_HUNGER, nethack.NLE_BL_CAP, nethack.NLE_BL_DEPTH, nethack.NLE_BL_XP,
                                   nethack.NLE_BL_AC)


def status_tokens(blstats: np.ndarray) -> np.ndarray:
    """blstats `... 27` -> the bottom line as categorical tokens `... 7` uint8 in [0, STATUS_LEVELS): hit points and
    energy as fractions of their maxima in 16 steps (15: full), hunger state (0 satiated ... 5 fainted, 6 starved),
    encumbrance (0-5), dungeon depth and experience level (clipped at 15), and armour class as 10 - AC (0: AC 10,
    the worst; clipped at AC -5). The frames show none of these. Plain Python per row, on one `tolist()`: an env
    step has one row, too small for numpy's per-call overhead to pay off."""
    b = np.asarray(blstats)
    if b.ndim > 1:
        rows = [status_tokens(row) for row in b.reshape(-1, b.shape[-1])]
        return np.stack(rows).reshape(*b.shape[:-1], STATUS_VARS)
    s = b.tolist()
    hp_max, energy_max = s[_HP_MAX], s[_ENERGY_MAX]
    tokens = (_TOP * max(s[_HP], 0) // hp_max if hp_max > 0 else 0,
              _TOP * max(s[_ENERGY], 0) // energy_max if energy_max > 0 else 0,
              s[_HUNGER], s[_CAP], s[_DEPTH], s[_XP], 10 - s[_AC])
    return np.array([0 if t < 0 else _TOP if t > _TOP else t for t in tokens], np.uint8)


@functools.cache
def glyph_tiles(factor: int = 1) -> np.ndarray:
    """The NetHack tileset indexed by glyph, box-averaged by ``factor`` (a divisor of 16).  Cached and
    read-only, so all envs of a process share one table (factor 1: (MAX_GLYPH+1) x 16 x 16 x 3 = 4.6 MB)."""
    if factor != 1:
        t = TILE // factor
        full = glyph_tiles(1).reshape(-1, t, factor, t, factor, 3).astype(np.uint16)
        tiles = ((full.sum((2, 4)) + factor * factor // 2) // (factor * factor)).astype(np.uint8)  # glyph t t 3
    else:
        glyph2tile = np.asarray(nethack.glyph2tile)
        game = nethack.Nethack(observation_keys=("glyphs",), ttyrec=None)  # default would write a ttyrec to cwd
        try:
            if not game.setup_tiles():
                raise RuntimeError("NLE failed to load its tileset")
            sheet = np.zeros(((int(glyph2tile.max()) + 1) * TILE, TILE, 3), np.uint8)  # (tiles*16) 16 3
            game.get_tileset(sheet)
        finally:
            game.close()
        tiles = np.zeros((nethack.MAX_GLYPH + 1, TILE, TILE, 3), np.uint8)  # glyph 16 16 3; NO_GLYPH black
        tiles[: nethack.MAX_GLYPH] = sheet.reshape(-1, TILE, TILE, 3)[glyph2tile]
    tiles.flags.writeable = False
    return tiles


def assemble(tiles: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Draw a glyph window with one gather: (n, n) glyphs -> (n*t, n*t, 3) image for t x t tiles."""
    n, t = window.shape[0], tiles.shape[1]
    return tiles[window].transpose(0, 2, 1, 3, 4).reshape(n * t, n * t, 3)  # n n t t 3 -> n t n t 3


class NetHackEnv(gymnasium.Env):
    """NLE task with observation {"image": tiles around the player (size size 3 uint8), "stats": blstats (27,),
    "status": the bottom line as 7 categorical tokens (`status_tokens`)}.

    Resize: the tile table is box-averaged by the largest factor f | 16 that keeps crop*16/f >= size
    (exact area downsampling, done once per process), then a precomputed nearest-neighbour index map covers
    the remaining ratio (< 2 for size >= crop; none when crop*16/f == size, e.g. crop 9 at 144,
    72 or 48 px; crop 9 at 64 px: 2x2 box, then 72 -> 64 nearest).  render() gives the crop at crop*16 px.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: str = ENV_DEFAULTS["task"], crop: int = ENV_DEFAULTS["crop"], size: int = 64,
                 max_episode_steps: int = ENV_DEFAULTS["max_episode_steps"],
                 stats_path: str | None = None, render_mode: str | None = None):
        if task not in TASKS:
            raise UsageError(f"unknown NetHack task {task!r}; valid: {sorted(TASKS)}")
        if crop < 1 or crop % 2 == 0:
            raise UsageError(f"crop must be an odd number >= 1 of map cells, got {crop}")
        if size < 1:
            raise UsageError(f"size must be >= 1, got {size}")
        if max_episode_steps < 1:
            raise UsageError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task, self.crop, self.size, self.render_mode = task, crop, size, render_mode
        self.stats_path = stats_path
        self.nle = TASKS[task](observation_keys=("glyphs", "blstats"), max_episode_steps=max_episode_steps,
                               fix_moon_phase=True)  # the wrapped NLE task env
        # (a window smaller than the image, crop*16 < size, is scaled up nearest-neighbour from the full tiles)
        self.factor = max((f for f in (1, 2, 4, 8, 16) if crop * TILE // f >= size), default=1)
        self.tiles = glyph_tiles(self.factor)  # glyph 16/f 16/f 3
        side = crop * TILE // self.factor  # px a side after the box filter
        self._index = None if side == size else (  # res: source pixel nearest each output pixel centre
            (np.arange(size) + 0.5) * side / size).astype(int)
        h = crop // 2
        self._padded = np.full((MAP_SHAPE[0] + 2 * h, MAP_SHAPE[1] + 2 * h), PAD_GLYPH, np.int16)
        self._map = self._padded[h: h + MAP_SHAPE[0], h: h + MAP_SHAPE[1]]  # view: glyphs are copied in here
        self.window = self._padded[:crop, :crop]  # crop crop: glyphs of the current crop (a view)
        self._blstats = np.zeros(N_STATS, np.int64)
        known_steps = self.nle._perform_known_steps

        glyphs, blstats = self.nle._glyph_index, self.nle._blstats_index  # in NLE's observation tuple

        def keep_then_skip(observation, done, exceptions=True):  # see the module doc: the state the action led to
            self._keep(observation[glyphs], observation[blstats])
            return known_steps(observation, done, exceptions=exceptions)

        self.nle._perform_known_steps = keep_then_skip
        vardir = getattr(self.nle.nethack, "_vardir", None)  # see the module doc: for the cause of death
        self._xlog_path = os.path.join(vardir, "xlogfile") if vardir and stats_path is not None else None
        self.observation_space = gymnasium.spaces.Dict({
            "image": gymnasium.spaces.Box(0, 255, (size, size, 3), np.uint8),
            # finite bounds (gymnasium's checker warns on infinite ones), far beyond any bottom-line value
            "stats": gymnasium.spaces.Box(-2.0**31, 2.0**31, (N_STATS,), np.float32),
            "status": gymnasium.spaces.MultiDiscrete([STATUS_LEVELS] * STATUS_VARS, dtype=np.uint8),
        })
        self.action_space = gymnasium.spaces.Discrete(len(self.nle.actions))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        core, disp = (int(s) for s in self.np_random.integers(0, 2**63 - 1, size=2))
        nethack.Nethack.set_initial_seeds(self.nle.nethack, core, disp, False)  # class method: see module doc
        obs, info = self.nle.reset()
        self._episode = {"length": 0, "reward": 0.0, "max_depth": 0}
        self._xlog_size = os.path.getsize(self._xlog_path) if self._xlog_path else 0  # this game's entry: after it
        return self._observe(obs), self._info(info)

    def step(self, action):
        obs, reward, done, _, info = self.nle.step(checked_action(action, self.action_space.n))
        truncated = bool(done and info["end_status"] == self.nle.StepStatus.ABORTED)
        observation = self._observe(obs)
        self._episode["length"] += 1
        self._episode["reward"] += float(reward)
        info = self._info(info)
        if done and self.stats_path is not None:
            self._write_summary(info)
        return observation, float(reward), bool(done and not truncated), truncated, info

    def render(self):
        return assemble(glyph_tiles(), self.window) if self.render_mode == "rgb_array" else None

    def close(self):
        self.nle.close()
        super().close()

    def _keep(self, glyphs: np.ndarray, blstats: np.ndarray) -> None:
        """Copy an in-game state's glyphs and bottom line (none once the game is over: all zero, so no maximum hit
        points, which a game in progress always has; one element is read, not 27: this runs up to twice a step)."""
        if blstats[_HP_MAX]:
            self._map[:] = glyphs
            self._blstats[:] = blstats

    def _observe(self, obs: dict) -> dict:
        """Crop the glyph map around the player and draw it; keeps the last in-game state after game over."""
        self._keep(obs["glyphs"], obs["blstats"])
        x, y = self._blstats[nethack.NLE_BL_X], self._blstats[nethack.NLE_BL_Y]
        self.window = self._padded[y: y + self.crop, x: x + self.crop]
        image = assemble(self.tiles, self.window)  # side side 3
        if self._index is not None:
            image = image.take(self._index, 0).take(self._index, 1)  # res res 3
        return {"image": image, "stats": self._blstats.astype(np.float32), "status": status_tokens(self._blstats)}

    def _info(self, nle_info: dict) -> dict:
        depth = int(self._blstats[nethack.NLE_BL_DEPTH])
        self._episode["max_depth"] = max(self._episode["max_depth"], depth)
        # end_status as a plain int (it still equals the StepStatus member): vector envs then batch it into an int
        # array instead of an object array of enums, which pickles ~2x slower on every worker reply.
        return {**nle_info, "end_status": int(nle_info["end_status"]), "score": int(self._blstats[nethack.NLE_BL_SCORE]),
                "depth": depth}

    def _write_summary(self, info: dict) -> None:
        record = {**self._episode, "score": info["score"], "depth": info["depth"],
                  "experience_level": int(self._blstats[nethack.NLE_BL_XP]),
                  "end_status": self.nle.StepStatus(info["end_status"]).name}
        if record["end_status"] == "DEATH":
            record["death"] = self._death()
        path = Path(self.stats_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _death(self) -> Optional[str]:
        """The cause of death NetHack logged for this game ("killed by a jackal, while fainted from lack of food"),
        or None where its xlogfile holds no new entry."""
        if not self._xlog_path:
            return None
        try:
            with open(self._xlog_path, "rb") as f:
                f.seek(self._xlog_size)
                entry = f.read().decode(errors="replace").strip()
        except OSError:
            return None
        fields = dict(kv.split("=", 1) for kv in entry.rsplit("\n", 1)[-1].split("\t") if "=" in kv)
        if "death" not in fields:
            return None
        return f"{fields['death']}, while {fields['while']}" if fields.get("while") else fields["death"]


def nethack_summary(records_or_path) -> dict:
    """Aggregate episode summaries: a list of dicts, or the path of a JSONL file written by NetHackEnv (or of the
    directory holding it as stats.jsonl). Means of return, score, depth and length; how many episodes ended in death
    ("died") and at the step limit ("step_limit"); the most frequent causes of death with their counts ("deaths")."""
    if isinstance(records_or_path, dict):
        raise UsageError("nethack_summary takes the episode records (a list of dicts), not one record: wrap it in a "
                         "list")
    records = records_or_path
    if isinstance(records_or_path, (str, Path)):
        path = Path(records_or_path)
        if path.is_dir():
            path = path / "stats.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no NetHack episode stats file at {path}")
        records = read_records(path)
    records = list(records)
    if not records:
        raise UsageError("no NetHack episodes to summarise")
    if "score" not in records[0] or "max_depth" not in records[0]:
        raise UsageError(f"these are not NetHack episode records (no score and max_depth, but {sorted(records[0])}); "
                         "Crafter's go to envs.crafter.crafter_score")
    n = len(records)
    ends = Counter(r.get("end_status") for r in records)
    return {"episodes": n,
            "mean_return": sum(r.get("reward", 0.0) for r in records) / n,  # the keys crafter_score shares
            "mean_score": sum(r["score"] for r in records) / n,
            "mean_depth": sum(r["depth"] for r in records) / n,
            "max_depth": max(int(r["max_depth"]) for r in records),
            "mean_length": sum(r["length"] for r in records) / n,
            "died": ends["DEATH"], "step_limit": ends["ABORTED"],  # episodes the game ended, and the step limit
            "deaths": dict(Counter(r["death"] for r in records if r.get("death")).most_common(DEATHS_LISTED))}
