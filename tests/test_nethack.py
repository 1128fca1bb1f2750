"""Tests for envs.nethack: NLE glyphs drawn with the NetHack tileset around the player, seeding, episode stats."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

nethack = pytest.importorskip("nle.nethack", reason="NetHack is the [nethack] extra: pip install -e \".[nethack]\"")

from envs.nethack import (PAD_GLYPH, STATUS_LEVELS, TILE, NetHackEnv, glyph_tiles,  # noqa: E402
                          nethack_summary, status_tokens)

ACTIONS = [1, 2, 3, 4, 5, 6, 7, 8, 1, 3, 5, 7, 2, 4, 6, 8, 18, 1, 2, 3]  # compass moves and search


def raw(env):
    """The wrapped NLE env's last glyphs (21, 79) and blstats (27,): its keys are (glyphs, blstats, ...)."""
    return env.nle.last_observation[0], env.nle.last_observation[1]


def nle_frame(env):
    """The whole map drawn by NLE's own pixel renderer: (21*16, 79*16, 3)."""
    assert env.nle.nethack.setup_tiles()
    frame = np.zeros(nethack.TILE_RENDER_SHAPE, np.uint8)
    env.nle.nethack.draw_frame(frame)
    return frame


@pytest.mark.parametrize("task", ["score", "challenge"])
def test_check_env(task):
    env = NetHackEnv(task=task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unbounded stats Box warns
        check_env(env, skip_render_check=True)
    env.close()


def test_spaces():
    env = NetHackEnv(crop=5, size=32)
    assert env.observation_space["image"].shape == (32, 32, 3)
    assert env.observation_space["stats"].shape == (nethack.NLE_BLSTATS_SIZE,) == (27,)
    assert env.action_space.n == len(env.nle.actions)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space and obs["image"].dtype == np.uint8
    assert env.render() is None
    env.close()


def test_crop_matches_nle_renderer():
    """Unresized image == the window of NLE's own pixel render around the player (black outside the map)."""
    crop = 7
    env = NetHackEnv(crop=crop, size=crop * TILE, render_mode="rgb_array")
    obs, _ = env.reset(seed=1)
    for a in ACTIONS[:6]:
        obs, *_ = env.step(a)
    glyphs, blstats = raw(env)
    x, y = blstats[nethack.NLE_BL_X], blstats[nethack.NLE_BL_Y]
    h = crop // 2
    frame = np.pad(nle_frame(env), ((h * TILE, h * TILE), (h * TILE, h * TILE), (0, 0)))
    expected = frame[y * TILE: (y + crop) * TILE, x * TILE: (x + crop) * TILE]
    np.testing.assert_array_equal(obs["image"], expected)
    np.testing.assert_array_equal(env.render(), obs["image"])
    # the centre cell is the player: its glyph, a monster glyph, drawn with the tileset's tile for it
    assert env.window[h, h] == glyphs[y, x] and nethack.glyph_is_monster(int(glyphs[y, x]))
    centre = obs["image"][h * TILE: (h + 1) * TILE, h * TILE: (h + 1) * TILE]
    np.testing.assert_array_equal(centre, glyph_tiles()[glyphs[y, x]])
    # one more cell, against a tile sheet read straight from NLE (get_tileset + glyph2tile)
    sheet = np.zeros(((max(nethack.glyph2tile) + 1) * TILE, TILE, 3), np.uint8)
    env.nle.nethack.get_tileset(sheet)
    glyph = env.window[h, h + 1]
    tile = sheet.reshape(-1, TILE, TILE, 3)[nethack.glyph2tile[glyph]]
    np.testing.assert_array_equal(obs["image"][h * TILE: (h + 1) * TILE, (h + 1) * TILE: (h + 2) * TILE], tile)
    env.close()


def test_padding_is_black_stone():
    crop = 31  # taller than the 21-row map: the window always reaches past it
    env = NetHackEnv(crop=crop, size=crop * TILE)
    obs, _ = env.reset(seed=2)
    glyphs, blstats = raw(env)
    x, y = blstats[nethack.NLE_BL_X], blstats[nethack.NLE_BL_Y]
    padded = np.pad(glyphs, crop // 2, constant_values=PAD_GLYPH)
    np.testing.assert_array_equal(env.window, padded[y: y + crop, x: x + crop])
    outside = env.window == PAD_GLYPH
    assert outside.any() and not glyph_tiles()[PAD_GLYPH].any()
    cells = obs["image"].reshape(crop, TILE, crop, TILE, 3).transpose(0, 2, 1, 3, 4)
    assert not cells[outside].any()
    env.close()


def test_resize():
    """72 px = exact 2x2 box average of the 144 px crop; 64 px = nearest samples of the 72 px image."""
    env72, env64 = NetHackEnv(size=72, render_mode="rgb_array"), NetHackEnv(size=64)
    obs72, _ = env72.reset(seed=5)
    obs64, _ = env64.reset(seed=5)
    full = env72.render().astype(np.float64)  # 144 144 3
    assert full.shape == (144, 144, 3)
    box = full.reshape(72, 2, 72, 2, 3).mean((1, 3))
    assert np.abs(obs72["image"] - box).max() <= 0.5
    idx = np.floor((np.arange(64) + 0.5) * 72 / 64).astype(int)
    np.testing.assert_array_equal(obs64["image"], obs72["image"][idx][:, idx])
    env72.close(), env64.close()
    small = NetHackEnv(crop=3, size=96, render_mode="rgb_array")  # a window smaller than the image: each pixel 2x2
    obs, _ = small.reset(seed=5)
    np.testing.assert_array_equal(obs["image"], small.render().repeat(2, 0).repeat(2, 1))
    small.close()


@pytest.mark.parametrize("task", ["score", "challenge"])
def test_seeding(task):
    a, b = NetHackEnv(task=task), NetHackEnv(task=task)
    obs_a, _ = a.reset(seed=3)
    obs_b, _ = b.reset(seed=3)
    np.testing.assert_array_equal(obs_a["image"], obs_b["image"])
    for action in ACTIONS:
        obs_a, rew_a, *_ = a.step(action)
        obs_b, rew_b, *_ = b.step(action)
        np.testing.assert_array_equal(obs_a["image"], obs_b["image"])
        np.testing.assert_array_equal(obs_a["stats"], obs_b["stats"])
        assert rew_a == rew_b
    again, _ = a.reset(seed=3)
    first, _ = b.reset(seed=3)
    np.testing.assert_array_equal(again["image"], first["image"])
    other, _ = b.reset(seed=4)
    assert not np.array_equal(raw(a)[0], raw(b)[0])  # a different dungeon level
    assert not (np.array_equal(other["image"], first["image"]) and np.array_equal(other["stats"], first["stats"]))
    a.close(), b.close()


def test_status_tokens_hand_computed():
    """The bottom line as tokens: HP 7/14 -> 15*7//14 = 7; energy 0/0 -> 0; hunger 4 (weak); encumbrance 2; depth
    20 and level 3 -> 15 and 3 (clipped); AC -8 -> 10-(-8) = 18 -> 15. A second row: full HP and energy, AC 10."""
    rows = np.zeros((2, nethack.NLE_BLSTATS_SIZE), np.int64)
    for row, values in zip(rows, ({"HP": 7, "HPMAX": 14, "ENE": 0, "ENEMAX": 0, "HUNGER": 4, "CAP": 2, "DEPTH": 20,
                                   "XP": 3, "AC": -8},
                                  {"HP": 30, "HPMAX": 30, "ENE": 5, "ENEMAX": 5, "HUNGER": 1, "CAP": 0, "DEPTH": 1,
                                   "XP": 1, "AC": 10})):
        for key, value in values.items():
            row[getattr(nethack, f"NLE_BL_{key}")] = value
    np.testing.assert_array_equal(status_tokens(rows), [[7, 0, 4, 2, 15, 3, 15], [15, 15, 1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(status_tokens(rows[0].astype(np.float32)), status_tokens(rows)[0])
    assert status_tokens(rows).dtype == np.uint8 and status_tokens(rows).max() < STATUS_LEVELS


def test_stats_and_info():
    env = NetHackEnv()
    obs, info = env.reset(seed=6)
    for action in ACTIONS[:5]:
        obs, _, _, _, info = env.step(action)
        blstats = raw(env)[1]
        assert obs["stats"].dtype == np.float32
        np.testing.assert_array_equal(obs["stats"], blstats.astype(np.float32))
        np.testing.assert_array_equal(obs["status"], status_tokens(blstats))
        assert obs["status"] in env.observation_space["status"]
        assert info["score"] == blstats[nethack.NLE_BL_SCORE]
        assert info["depth"] == blstats[nethack.NLE_BL_DEPTH] == 1
        assert info["end_status"] == env.nle.StepStatus.RUNNING
    env.close()


def test_the_step_limits_last_observation_is_the_state_its_action_led_to():
    """NLE quits a game at its step limit inside that step, zeroing the arrays the step returns: the final
    observation is still the state the last action led to (an unlimited game's at that step), not the one before."""
    probe = NetHackEnv()
    actions, runs = np.random.default_rng(5).integers(probe.action_space.n, size=40), []
    probe.close()
    for limit in (40, 10000):
        env = NetHackEnv(max_episode_steps=limit)
        observations = [env.reset(seed=11)[0]]
        for action in actions:
            obs, _, terminated, truncated, info = env.step(int(action))
            observations.append(obs)
        assert (terminated, truncated) == (False, limit == 40)
        runs.append(observations)
        env.close()
    short, full = runs
    for t in (39, 40):
        for key in ("image", "stats", "status"):
            np.testing.assert_array_equal(short[t][key], full[t][key], err_msg=f"{key} at step {t}")
    assert any((full[40][key] != full[39][key]).any() for key in ("image", "stats"))  # the last step changed it


def test_episode_jsonl(tmp_path):
    path = tmp_path / "runs" / "nethack.jsonl"
    env = NetHackEnv(max_episode_steps=5, stats_path=str(path))
    rewards = []
    for episode in range(2):
        env.reset(seed=episode)
        total = 0.0
        for t in range(5):
            obs, reward, terminated, truncated, info = env.step(ACTIONS[t])
            total += reward
            assert terminated is False and truncated is (t == 4)
        rewards.append(total)
        assert obs["stats"].any() and obs["image"].any()  # the last in-game state, not NLE's zeroed one
        assert info["end_status"] == env.nle.StepStatus.ABORTED and info["depth"] == 1
    env.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2
    for record, total in zip(records, rewards):
        assert set(record) == {"length", "reward", "score", "depth", "max_depth", "experience_level", "end_status"}
        assert record["length"] == 5 and record["end_status"] == "ABORTED"
        assert record["depth"] == record["max_depth"] == 1 and record["experience_level"] >= 1
        assert record["reward"] == pytest.approx(total)
    summary = nethack_summary(path)
    assert summary["episodes"] == 2 and summary["mean_length"] == 5.0 and summary["max_depth"] == 1


def test_summary():
    common = {"experience_level": 1, "end_status": "DEATH"}
    records = [{"length": 100, "reward": 1.0, "score": 10, "depth": 1, "max_depth": 2, **common},
               {"length": 50, "reward": 4.0, "score": 30, "depth": 3, "max_depth": 3, **common}]
    assert nethack_summary(records) == {"episodes": 2, "mean_return": 2.5, "mean_score": 20.0, "mean_depth": 2.0,
                                        "max_depth": 3, "mean_length": 75.0, "died": 2, "step_limit": 0, "deaths": {}}
    records += [{**records[0], "death": "killed by a jackal"}, {**records[1], "death": "killed by a newt"},
                {**records[0], "death": "killed by a jackal"}, {**records[1], "end_status": "ABORTED"}]
    summary = nethack_summary(records)
    assert (summary["died"], summary["step_limit"]) == (5, 1)
    assert summary["deaths"] == {"killed by a jackal": 2, "killed by a newt": 1}
    assert list(summary["deaths"]) == ["killed by a jackal", "killed by a newt"]  # the most frequent first


def test_a_death_is_recorded_with_its_cause(tmp_path):
    """Random play of game 0 dies (NetHack logs "killed by a jackal"); the summary reads the entry this game added
    to the xlogfile, and a second game's death its own entry, not the first's. The death's observation is the state
    the deadly action led to (fewer hit points), not a repeat of the one before."""
    path = tmp_path / "stats.jsonl"
    env = NetHackEnv(max_episode_steps=3000, stats_path=str(path))
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        obs = env.reset(seed=seed)[0]
        terminated = truncated = False
        while not (terminated or truncated):
            before = obs
            obs, _, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        assert terminated and info["end_status"] == env.nle.StepStatus.DEATH
        hit_points = (obs["stats"][nethack.NLE_BL_HP], before["stats"][nethack.NLE_BL_HP])
        assert hit_points == ((0, 1) if seed == 0 else (4, 6))  # the bottom line as NetHack last drew it
        assert obs["status"][0] < before["status"][0] and obs["stats"][nethack.NLE_BL_HPMAX] > 0
    env.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["death"] for r in records] == ["killed by a jackal", "killed by a gnome lord"]
    assert nethack_summary(path)["deaths"] == {"killed by a jackal": 1, "killed by a gnome lord": 1}


def test_summary_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        nethack_summary(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError):
        nethack_summary(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError):
        nethack_summary([])
    crafter = {"length": 10, "reward": 1.0, "achievement_collect_wood": 1}  # another game's records: named
    with pytest.raises(ValueError, match="not NetHack episode records .*envs.crafter.crafter_score"):
        nethack_summary([crafter])
    from envs.crafter import crafter_score

    nethack = {"length": 10, "reward": 1.0, "score": 5, "depth": 1, "max_depth": 1}
    with pytest.raises(ValueError, match="not crafter episode records .*envs.nethack.nethack_summary"):
        crafter_score([nethack])
    (tmp_path / "run").mkdir()  # a directory: its stats.jsonl, as crafter_score reads it
    (tmp_path / "run" / "stats.jsonl").write_text(json.dumps(nethack) + "\n")
    assert nethack_summary(tmp_path / "run")["mean_score"] == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"task": "oracle"}, "challenge"), ({"crop": 8}, "odd"), ({"crop": 0}, "odd"), ({"crop": -3}, "odd"),
    ({"size": 0}, "size"), ({"max_episode_steps": 0}, "max_episode_steps"),
    ({"render_mode": "human"}, "render_mode"),
])
def test_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NetHackEnv(**kwargs)


def test_nethack_summary_max_depth_is_the_deepest_level_reached():
    """max_depth is the deepest level any episode reached (its max_depth, 3), not where an episode ended (its depth,
    at most 2); means over 2 episodes: score (10 + 20) / 2, depth (1 + 2) / 2, length (5 + 7) / 2, return (1 + 3) / 2."""
    from envs.nethack import nethack_summary

    records = [{"score": 10, "depth": 1, "max_depth": 3, "length": 5, "reward": 1.0},
               {"score": 20, "depth": 2, "max_depth": 2, "length": 7, "reward": 3.0}]
    assert nethack_summary(records) == {"episodes": 2, "mean_return": 2.0, "mean_score": 15.0, "mean_depth": 1.5,
                                        "max_depth": 3, "mean_length": 6.0, "died": 0, "step_limit": 0, "deaths": {}}
    assert nethack_summary(iter(records)) == nethack_summary(records)  # any iterable, as crafter_score takes
    with pytest.raises(ValueError, match="not one record: wrap it in a list"):
        nethack_summary(records[0])
