"""Episode files: the step layout, cut and flushed episodes, bad datasets, and pretraining on env frames."""
import json
import os

import numpy as np
import pytest
import torch

from envs.errors import DataError
from envs.episodes import EpisodeWriter, episode_paths, iter_episodes, load_frames, read_meta
import run
from world_model.pretrain import pretrain
from world_model.sources import EpisodeFrames

from test_pretrain import tiny_cfg


def _frame(value, size=8):
    return np.full((size, size, 3), value, np.uint8)


def test_writer_layout_two_envs(tmp_path):
    w = EpisodeWriter(tmp_path, {"env": "toy"})
    w.begin(0, _frame(0))
    w.begin(1, _frame(100))
    w.step(0, _frame(1), action=3, reward=0.5, terminated=False, truncated=False)
    w.step(1, _frame(101), action=1, reward=1.0, terminated=True, truncated=False)  # env 1 ends: written
    w.step(0, _frame(2), action=4, reward=0.0, terminated=False, truncated=True)  # env 0 truncated
    eps = list(iter_episodes(tmp_path))
    assert len(eps) == 2 and w.frames == 5
    first = eps[0]  # env 1 finished first
    np.testing.assert_array_equal(first["image"][:, 0, 0, 0], [100, 101])
    np.testing.assert_array_equal(first["action"], [0, 1])
    np.testing.assert_array_equal(first["reward"], [0.0, 1.0])
    np.testing.assert_array_equal(first["is_first"], [True, False])
    np.testing.assert_array_equal(first["is_last"], [False, True])
    np.testing.assert_array_equal(first["is_terminal"], [False, True])
    second = eps[1]
    np.testing.assert_array_equal(second["action"], [0, 3, 4])
    np.testing.assert_array_equal(second["is_terminal"], [False, False, False])
    assert second["is_last"][-1]
    assert read_meta(tmp_path)["env"] == "toy"


def _write_episodes(root, values):
    w = EpisodeWriter(root, {"env": "toy"})
    for v in values:
        w.begin(0, _frame(v))
        w.step(0, _frame(v), action=1, reward=float(v), terminated=True, truncated=False)
    return w


def test_episodes_added_after_one_was_removed_take_new_numbers_and_keep_their_order(tmp_path):
    """Removing an episode file (what a damaged one's error advises) must not make the next collection write over a
    live one: numbers continue past the highest. The order is by number, also past 999999."""
    _write_episodes(tmp_path, [0, 1, 2])
    (tmp_path / "episodes" / "000000-2.npz").unlink()
    w = _write_episodes(tmp_path, [99])
    assert w.count == 3 and w.next_index == 4
    assert [p.name for p in episode_paths(tmp_path)] == ["000001-2.npz", "000002-2.npz", "000003-2.npz"]
    assert [e["reward"][-1] for e in iter_episodes(tmp_path)] == [1.0, 2.0, 99.0]
    for name in ("000001-2.npz", "000002-2.npz", "000003-2.npz"):
        (tmp_path / "episodes" / name).unlink()
    _write_episodes(tmp_path, [7])
    (tmp_path / "episodes" / "000000-2.npz").rename(tmp_path / "episodes" / "999999-2.npz")
    w = _write_episodes(tmp_path, [8])
    assert w.next_index == 1_000_001
    assert [p.name for p in episode_paths(tmp_path)] == ["999999-2.npz", "1000000-2.npz"]
    (tmp_path / "episodes" / "1000000-2.npz").rename(tmp_path / "episodes" / "000005-2.npz")  # two files numbered 5
    (tmp_path / "episodes" / "999999-2.npz").rename(tmp_path / "episodes" / "000005-3.npz")  # (the old writer's)
    assert [p.name for p in episode_paths(tmp_path)] == ["000005-2.npz", "000005-3.npz"]  # by name, not listing order
    with pytest.raises(DataError, match=r"000005-3.npz holds 2 frames, its name 3: a file renamed or replaced"):
        load_frames(tmp_path)
    (tmp_path / "episodes" / "notes-x.npz").write_bytes(b"")
    with pytest.raises(DataError, match="notes-x.npz: not an episode file name"):
        EpisodeWriter(tmp_path, {"env": "toy"})


def test_flush_cuts_running_episodes_and_dict_obs(tmp_path):
    w = EpisodeWriter(tmp_path, {"env": "toy"})
    obs = lambda v: {"image": _frame(v), "stats": np.arange(3, dtype=np.float32) + v}  # noqa: E731
    w.begin(0, obs(0))
    w.step(0, obs(1), 2, 0.0, False, False)
    w.begin(1, obs(5))  # only a first observation: nothing to write
    w.flush()
    (ep,) = iter_episodes(tmp_path)
    assert ep["stats"].shape == (2, 3) and ep["is_last"][-1] and not ep["is_terminal"].any()
    assert load_frames(tmp_path)[0].shape == (2, 8, 8, 3) and load_frames(tmp_path)[1] == [2]


def test_bad_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no meta.json"):
        episode_paths(tmp_path)
    with pytest.raises(DataError, match=r"no meta.json\) \(a relative path, read from "):  # run from elsewhere
        episode_paths("runs/no_such_dataset")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")  # a run directory given as data
    with pytest.raises(DataError, match="run directory, not an episode dataset"):
        episode_paths(tmp_path / "run")
    (tmp_path / "meta.json").write_text(json.dumps({"env": "toy"}))
    with pytest.raises(DataError, match="no .npz"):
        episode_paths(tmp_path)
    (tmp_path / "episodes").mkdir(exist_ok=True)
    (tmp_path / "episodes" / "000000-3.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        load_frames(tmp_path)
    _toy_dataset(tmp_path / "cut", episodes=1)
    (npz,) = (tmp_path / "cut" / "episodes").glob("*.npz")
    os.truncate(npz, npz.stat().st_size // 2)  # a zip without its directory
    with pytest.raises(DataError, match="unreadable episode file"):
        load_frames(tmp_path / "cut")
    for text, message in (("{bad json", "meta.json is damaged"), ("{}", "does not describe an episode dataset")):
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(DataError, match=message):
            episode_paths(tmp_path)


def test_episodes_join_only_a_dataset_of_the_same_env_and_layout(tmp_path, capsys):
    """More episodes may be added to a dataset from another seed; another env's dataset, a seed already collected
    and a run directory are refused before anything is written."""
    meta = {"env": "crafter", "num_actions": 17, "obs_keys": ["image"], "image_shape": [64, 64, 3]}

    def one_episode(writer):
        writer.begin(0, _frame(0))
        writer.step(0, _frame(1), 0, 0.0, True, False)

    one_episode(EpisodeWriter(tmp_path / "d", {**meta, "seed": 0}))
    EpisodeWriter(tmp_path / "d", {**meta, "seed": 1})  # stopped before its first episode: seed 1 stays free
    assert json.loads((tmp_path / "d" / "meta.json").read_text()) == {**meta, "env_seeds": [[0, 1]]}
    one_episode(EpisodeWriter(tmp_path / "d", {**meta, "seed": 1, "num_envs": 4}))  # env seeds 1..4
    assert json.loads((tmp_path / "d" / "meta.json").read_text()) == {**meta, "env_seeds": [[0, 1], [1, 4]]}
    for seed, n in ((1, 1), (4, 2), (-1, 3)):  # any overlap with 0..4 would replay a world already collected
        with pytest.raises(DataError, match=r"already holds the episodes of env seed .*pass --seed 5 or more"):
            EpisodeWriter(tmp_path / "d", {**meta, "seed": seed, "num_envs": n})
    EpisodeWriter(tmp_path / "d", {**meta, "seed": 5, "num_envs": 2})
    with pytest.raises(DataError, match="env='crafter', not 'nethack'"):
        EpisodeWriter(tmp_path / "d", {**meta, "env": "nethack", "seed": 2})
    # a game's default given explicitly is the same setting; another value is another layout
    EpisodeWriter(tmp_path / "d", {**meta, "seed": 7, "env_kwargs": {"max_episode_steps": 10_000, "size": 64}})
    with pytest.raises(DataError, match=r"env_kwargs=None, not \{'max_episode_steps': 20\}"):
        EpisodeWriter(tmp_path / "d", {**meta, "seed": 7, "env_kwargs": {"max_episode_steps": 20}})
    (tmp_path / "old").mkdir()  # a dataset written before seeds were listed
    (tmp_path / "old" / "meta.json").write_text(json.dumps({**meta, "seed": 0}))
    with pytest.raises(DataError, match="seed 0"):
        EpisodeWriter(tmp_path / "old", {**meta, "seed": 0})
    EpisodeWriter(tmp_path / "old", {**meta, "seed": 1})  # allowed, though its collection may have played seed 1: said
    assert "lists only the first env seed of each earlier collection (0)" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: setpred\n")
    with pytest.raises(DataError, match="is a run directory"):
        EpisodeWriter(tmp_path / "run", {**meta, "seed": 0})
    assert not (tmp_path / "run" / "episodes").exists()


def _toy_dataset(root, episodes=4, length=12, size=16):
    rng = np.random.default_rng(0)
    w = EpisodeWriter(root, {"env": "toy"})
    for e in range(episodes):
        w.begin(0, rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        for t in range(length - 1):
            w.step(0, rng.integers(0, 255, (size, size, 3), dtype=np.uint8), 0, 0.0, False, t == length - 2)
    return root


def test_frames_source_split_and_resize(tmp_path):
    root = _toy_dataset(tmp_path / "data")
    cfg = tiny_cfg("task=discovery", "data.source=frames", f"data.root={root}", "data.eval_images=4")
    train, held = EpisodeFrames(cfg, "train", torch.device("cpu")), EpisodeFrames(cfg, "eval", torch.device("cpu"))
    assert len(train.frames) == 36 and len(held.frames) == 12  # the last episode, as train-wm holds it out
    assert [len(b["images"]) for b in held.sequential(3, max_images=cfg.data.eval_images)] == [3, 1]
    two = tiny_cfg("task=discovery", "data.source=frames", f"data.root={root}", "data.eval_fraction=0.3")
    assert len(EpisodeFrames(two, "eval", torch.device("cpu")).frames) == 24  # 12 frames are not 30% of 48
    batch = train.batch(5, seed=1)
    assert batch["images"].shape == (5, 3, 32, 32) and 0 <= batch["images"].min() and batch["images"].max() <= 1
    torch.testing.assert_close(batch["images"], train.batch(5, seed=1)["images"])
    with pytest.raises(ValueError, match="task=discovery"):
        EpisodeFrames(tiny_cfg("data.source=frames", f"data.root={root}"), "train", torch.device("cpu"))
    small = _toy_dataset(tmp_path / "small", episodes=1, length=9)  # nothing left to evaluate on
    with pytest.raises(DataError, match="holds 1 episode: pretraining needs at least 2, the last ones held out"):
        EpisodeFrames(tiny_cfg("task=discovery", "data.source=frames", f"data.root={small}"), "train",
                      torch.device("cpu"))


def test_pretraining_on_a_dataset_without_episodes_is_refused_before_the_config_prints(tmp_path, capsys):
    """A dataset whose episodes were removed (its meta.json left): one line, and no config dump above it."""
    empty = _toy_dataset(tmp_path / "empty", episodes=1)
    for path in (empty / "episodes").iterdir():
        path.unlink()
    assert run.main(["pretrain", "--data", str(empty), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: {empty / 'episodes'} holds no .npz episodes; collect some " \
        "with `run.py collect`\n"
    _toy_dataset(empty, episodes=1)
    assert run.main(["pretrain", "--data", str(empty), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{empty} holds 1 episode: pretraining needs at least 2" in captured.err


def test_pretrain_on_env_frames(tmp_path, capsys):
    root = _toy_dataset(tmp_path / "data")
    cfg = tiny_cfg("task=discovery", "data.source=frames", f"data.root={root}", "train.steps=4", "data.crop=true")
    result = pretrain(cfg, str(tmp_path / "run"), progress=False)
    err = capsys.readouterr().err
    assert "note: data.crop=true cuts CLEVR's object-discovery window; game frames are used whole" in err
    assert f"note: the held-out episodes of {root} hold 12 of its 48 frames (25%, data.eval_fraction=0.1)" in err
    assert result["images"] == 8 and np.isfinite(result["mse"]) and "fg_ari" not in result  # eval_images of 12
    # eval-ap reproduces the run's own final evaluation (fixed chunks: the same slot-initialization noise)
    assert run.main(["eval-ap", "--checkpoint", str(tmp_path / "run")]) == 0
    again = json.loads((tmp_path / "run" / "eval_ap.json").read_text())
    assert again["mse"] == result["mse"] and again["empty_slots"] == result["empty_slots"]
    out, err = capsys.readouterr()
    assert f"(held-out frames of {root})" in out and "hold no instance masks (game frames come without them)" in err


def test_a_step_cut_short_by_an_interrupt_is_dropped_whole(tmp_path):
    """Ctrl-C while step() appends a step leaves its keys of different lengths; flush() writes the whole steps."""
    w = EpisodeWriter(tmp_path, {"env": "toy"})
    w.begin(0, _frame(0))
    w.step(0, _frame(1), 2, 0.5, False, False)
    w.buffers[0]["image"].append(_frame(2))  # the next step's observation went in, its action did not
    w.flush()
    (ep,) = iter_episodes(tmp_path)
    assert len(ep["image"]) == len(ep["action"]) == 2 and ep["is_last"][-1] and ep["reward"][-1] == 0.5


def test_a_lone_first_observation_is_not_written_as_an_episode(tmp_path):
    """begin() twice for an env (an env reset before it stepped): the first begin's single observation is no
    episode and is dropped; an episode of one step after it is written as 2 frames."""
    from envs.episodes import EpisodeWriter, episode_paths

    w = EpisodeWriter(tmp_path, {"env": "toy", "num_actions": 2})
    frame = np.zeros((2, 2, 3), np.uint8)
    w.begin(0, frame)
    w.begin(0, frame)
    w.step(0, frame, 1, 0.0, terminated=True, truncated=False)
    assert [p.name for p in episode_paths(tmp_path)] == ["000000-2.npz"] and w.frames == 2


def test_a_first_step_records_no_action_reward_or_end():
    """step_records in the episode layout: a first step holds action 0, reward 0 and no end, whatever the env sent
    with it; a later step keeps its action, reward, end (terminated or truncated) and terminal flag (terminated)."""
    from envs.episodes import step_records

    first = np.array([True, False, False])
    rec = step_records({"image": np.zeros((3, 1), np.uint8)}, np.array([5, 6, 7]), np.array([1.0, 2.0, 3.0]),
                        np.array([True, True, False]), np.array([False, False, True]), first)
    assert rec["action"].tolist() == [0, 6, 7] and rec["reward"].tolist() == [0.0, 2.0, 3.0]
    assert rec["is_last"].tolist() == [False, True, True] and rec["is_terminal"].tolist() == [False, True, False]
    assert rec["is_first"].tolist() == [True, False, False]


def test_the_writer_holds_a_copy_of_each_envs_row_not_a_view_of_the_whole_step(tmp_path):
    """A view of row i would keep every env's frames of that step alive while env i's episode runs (one long NetHack
    episode beside short ones: num_envs times the memory), and would change if the vector env reused its arrays."""
    from envs.episodes import step_records

    writer = EpisodeWriter(tmp_path / "d", {"env": "toy"})
    images = np.arange(12, dtype=np.uint8).reshape(3, 2, 2, 1)
    for first in (np.ones(3, bool), np.zeros(3, bool)):
        steps = step_records({"image": images}, np.ones(3), np.zeros(3), np.zeros(3, bool), np.zeros(3, bool), first)
        writer.add_steps(steps, range(3))
        for env in range(3):
            assert not np.shares_memory(writer.buffers[env]["image"][-1], images)
    images[:] = 0
    assert writer.buffers[2]["image"][0].ravel().tolist() == [8, 9, 10, 11]


def test_the_advice_to_collect_more_names_the_next_free_seed(tmp_path):
    """A dataset too small to hold episodes out says which `collect` adds to it: past every env seed it holds."""
    from envs.episodes import more_episodes_command

    w = EpisodeWriter(tmp_path / "d", {"env": "toy", "seed": 5, "num_envs": 2})  # envs 5 and 6
    w.begin(0, _frame(0))
    w.step(0, _frame(1), 1, 0.0, True, False)
    assert more_episodes_command(tmp_path / "d") == f"`run.py collect --env toy --out {tmp_path / 'd'} --seed 7`"
    cfg = tiny_cfg("task=discovery", "data.source=frames", f"data.root={tmp_path / 'd'}")
    with pytest.raises(DataError, match=r"holds 1 episode: .* collect more into it with `run.py collect --env toy "
                       r"--out .*d --seed 7`"):
        EpisodeFrames(cfg, "train", torch.device("cpu"))
