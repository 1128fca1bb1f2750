"""Crafter wrapper: gymnasium conformance, identity with raw crafter, episode stats, the benchmark score."""
import json
import math

import crafter
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers slotworld/Crafter-v0)
from envs.crafter import ACHIEVEMENTS, CrafterEnv, crafter_score, read_stats


def test_registered_and_passes_env_checker():
    env = gym.make("slotworld/Crafter-v0")
    assert env.observation_space.shape == (64, 64, 3) and env.observation_space.dtype == np.uint8
    assert env.action_space.n == 17
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def test_frames_identical_to_raw_crafter_under_same_actions():
    # Raw crafter drifts from itself after ~100 steps (it despawns by set iteration order), so a shorter horizon.
    env, raw = CrafterEnv(), crafter.Env(seed=7)
    obs, _ = env.reset(seed=7)
    np.testing.assert_array_equal(obs, raw.reset())
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = int(rng.integers(17))
        obs, reward, terminated, truncated, info = env.step(a)
        robs, rreward, rdone, rinfo = raw.step(a)
        np.testing.assert_array_equal(obs, robs)
        assert reward == rreward and (terminated or truncated) == rdone
        assert info["achievements"] == rinfo["achievements"]
    # The next episode of the same env matches raw crafter's second episode too.
    np.testing.assert_array_equal(env.reset()[0], raw.reset())


def test_a_seeded_game_repeats_exactly():
    """Two envs of one seed in one process, stepped alike, stay identical for whole episodes. Raw crafter's did not:
    it picks the creature to despawn by the iteration order of a set of objects, i.e. by memory address; with other
    objects allocated between the two envs' steps this test fails on a wrapper without `_ChunkObjects`."""
    for seed in range(4):
        a, b = CrafterEnv(max_episode_steps=300), CrafterEnv(max_episode_steps=300)
        a.reset(seed=seed)
        clutter = [object() for _ in range(1000)]  # moves the second env's objects to other addresses
        b.reset(seed=seed)
        rng = np.random.default_rng(seed)
        for t in range(300):
            action = int(rng.integers(17))
            obs_a, *_ = a.step(action)
            clutter.append([object() for _ in range(int(rng.integers(50)))])
            obs_b, _, terminated, truncated, _ = b.step(action)
            assert np.array_equal(obs_a, obs_b), f"seed {seed}: the games diverged at step {t}"
            if terminated or truncated:
                break


def test_seeds_differ_and_repeat():
    env = CrafterEnv()
    a, b, a2 = env.reset(seed=1)[0], env.reset(seed=2)[0], env.reset(seed=1)[0]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, a2)


def test_truncation_and_stats_file(tmp_path):
    path = tmp_path / "run" / "stats.jsonl"
    env = CrafterEnv(max_episode_steps=5, stats_path=path)
    for episode in range(2):
        env.reset(seed=episode)
        for t in range(5):
            _, _, terminated, truncated, _ = env.step(0)
            assert not terminated and truncated == (t == 4)
        with pytest.raises(gym.error.ResetNeeded, match=r"the episode ended: call reset\(\) before step\(\)"):
            env.step(0)  # crafter itself plays on, writing the episode's stats line again
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    with pytest.raises(gym.error.ResetNeeded, match=r"^call reset\(\) before step\(\)"):
        CrafterEnv().step(0)
    record = json.loads(lines[0])
    assert record["length"] == 5
    assert set(record) == {"length", "reward"} | {f"achievement_{a}" for a in ACHIEVEMENTS}
    assert len(read_stats(tmp_path / "run")) == 2


def _record(**unlocked):
    r = {"length": 100, "reward": 1.0}
    r.update({f"achievement_{a}": unlocked.get(a, 0) for a in ACHIEVEMENTS})
    return r


def test_crafter_score_hand_computed():
    records = [_record(collect_wood=2, place_table=1), _record(collect_wood=1), _record(), _record()]
    out = crafter_score(records)
    # collect_wood in 2 of 4 episodes = 50 %, place_table in 1 of 4 = 25 %, the other 20 at 0 %.
    assert out["success_rates"]["collect_wood"] == 50.0 and out["success_rates"]["place_table"] == 25.0
    expected = math.exp((math.log(51) + math.log(26)) / 22) - 1
    assert out["score"] == pytest.approx(expected)
    assert out["episodes"] == 4
    assert crafter_score([_record()])["score"] == 0.0
    assert crafter_score([_record(**{a: 1 for a in ACHIEVEMENTS})])["score"] == pytest.approx(100.0)


def test_crafter_score_from_file_skips_torn_line(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text(json.dumps(_record(eat_cow=1)) + "\n" + json.dumps(_record()) + "\n" + '{"length": 3, "rew')
    out = crafter_score(path)
    assert out["episodes"] == 2 and out["success_rates"]["eat_cow"] == 50.0


def test_crafter_score_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        crafter_score(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="at least one"):
        crafter_score([])
    with pytest.raises(ValueError, match="unknown achievements"):
        crafter_score([{"achievement_fly": 1}])
    with pytest.raises(ValueError, match="not one record: wrap it in a list"):  # not its keys, read one by one
        crafter_score({"achievement_collect_coal": 1})


def test_a_size_too_small_for_the_renderer_or_no_step_limit_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"crafter size must be >= 18 pixels \(2 per view cell\), got 17"):
        CrafterEnv(size=17)
    with pytest.raises(ValueError, match=r"max_episode_steps must be >= 1, got 0"):  # crafter: 0 would be no limit
        CrafterEnv(max_episode_steps=0)
    env = CrafterEnv(size=18)  # the smallest crafter renders with its 9x9 view
    assert env.reset(seed=0)[0].shape == (18, 18, 3) and env.step(0)[0].shape == (18, 18, 3)
