"""Replay buffer: segments stay inside one episode, uniform starts, eviction, interleaved workers, datasets,
exact save/load resume, and errors. Every step's "tag" is its (episode id, t), so segments check themselves."""
from collections import Counter

import numpy as np
import pytest
import torch

from agent.replay import ReplayBuffer
from envs.errors import DataError
from envs.episodes import STEP_KEYS, EpisodeWriter, iter_episodes

SPEC = {"image": ((2, 2, 3), np.uint8), "tag": ((2,), np.int64)}


def _step(ep: int, t: int, last: bool = False) -> dict:
    return {"image": np.full((2, 2, 3), (ep * 7 + t) % 256, np.uint8), "tag": np.array([ep, t]),
            "action": t % 3, "reward": float(t), "is_first": t == 0, "is_last": last, "is_terminal": last}


def _episode(ep: int, length: int, first_t: int = 0) -> dict:
    steps = [_step(ep, t, last=t == first_t + length - 1) for t in range(first_t, first_t + length)]
    return {k: np.stack([np.asarray(s[k]) for s in steps]) for k in steps[0]}


def _starts(seg: dict) -> set[tuple[int, int]]:
    """Checks every segment is consecutive steps of one episode; returns their (episode, first t)."""
    tag = seg["tag"]  # b t 2
    assert (tag[:, :, 0] == tag[:, :1, 0]).all(), "segment crosses episodes"
    assert (np.diff(tag[:, :, 1], axis=1) == 1).all(), "segment steps not consecutive"
    assert not seg["is_first"][:, 1:].any()
    np.testing.assert_array_equal(seg["is_first"][:, 0], tag[:, 0, 1] == 0)
    np.testing.assert_array_equal(seg["image"][:, :, 0, 0, 0], (tag[..., 0] * 7 + tag[..., 1]) % 256)
    np.testing.assert_array_equal(seg["reward"], tag[..., 1])
    return {(int(e), int(t)) for e, t in tag[:, 0]}


def _valid_starts(stored: dict[int, list[int]], length: int) -> set[tuple[int, int]]:
    """Reference: every start whose `length` steps are stored steps of one episode."""
    return {(e, t) for e, ts in stored.items() for t in ts if all(t + i in ts for i in range(length))}


def test_segments_stay_inside_episodes_and_sampling_is_seeded():
    bufs = [ReplayBuffer(1000, SPEC, seed=s) for s in (3, 3, 4)]
    for buf in bufs:
        for ep, length in enumerate([5, 9, 1, 30, 12]):
            buf.add_episode(_episode(ep, length))
    assert len(bufs[0]) == 57 and bufs[0].num_episodes == 5 and bufs[0].steps_added == 57
    segs = [buf.sample(64, 6) for buf in bufs]
    _starts(segs[0])
    assert segs[0]["image"].dtype == np.uint8 and segs[0]["image"].shape == (64, 6, 2, 2, 3)
    assert segs[0]["action"].dtype == np.int64 and segs[0]["is_first"].dtype == bool
    np.testing.assert_array_equal(segs[0]["tag"], segs[1]["tag"])
    assert not np.array_equal(segs[0]["tag"], segs[2]["tag"])
    # a sample from a given generator (evaluations, pictures) leaves the buffer's own stream where it was
    aside = [bufs[0].sample(8, 6, np.random.default_rng(7))["tag"] for _ in range(2)]
    np.testing.assert_array_equal(aside[0], aside[1])
    np.testing.assert_array_equal(bufs[0].sample(64, 6)["tag"], bufs[1].sample(64, 6)["tag"])


def test_starts_are_uniform_over_valid_positions():
    buf = ReplayBuffer(100, SPEC, seed=0)
    for ep, length in enumerate([5, 8, 3, 2]):  # starts for length 3: 3 + 6 + 1 + 0
        buf.add_episode(_episode(ep, length))
    seg = buf.sample(10_000, 3)
    counts = Counter(map(tuple, seg["tag"][:, 0].tolist()))
    assert set(counts) == _valid_starts({0: list(range(5)), 1: list(range(8)), 2: [0, 1, 2]}, 3)
    assert len(counts) == 10 and all(850 < c < 1150 for c in counts.values())  # 1000 expected, sd ~30


def _padded_starts(seg: dict, stored: dict[int, list[int]]) -> Counter:
    """Checks padded training segments: the valid steps are consecutive steps of one episode up to its last stored
    step at most, every invalid step repeats the last valid one, and a segment is cut short only at that last
    stored step. Returns the count of each (episode, first t)."""
    tag, valid = seg["tag"], seg["valid"]  # b t 2, b t
    assert valid.dtype == bool and valid[:, 0].all() and (np.diff(valid.astype(int), axis=1) <= 0).all()
    n = valid.sum(1)
    last = tag[np.arange(len(n)), n - 1]  # b 2: the last valid step
    for i in range(len(n)):
        assert (tag[i, :n[i], 0] == tag[i, 0, 0]).all() and (np.diff(tag[i, :n[i], 1]) == 1).all()
        assert (tag[i, n[i]:] == last[i]).all() and (seg["image"][i, n[i]:] == seg["image"][i, n[i] - 1]).all()
        if n[i] < valid.shape[1]:
            assert last[i, 1] == max(stored[int(last[i, 0])])  # cut short only at the episode's last stored step
    return Counter(map(tuple, tag[:, 0].tolist()))


def test_padded_segments_start_anywhere_so_episode_ends_come_at_every_position():
    """Training segments (pad=True) start uniformly at every stored step, also in episodes shorter than the
    segment, and are padded past the episode's end: terminal steps then appear at every position of a segment,
    as often as the steps before them (within a few percent), instead of once per episode at its last position."""
    buf = ReplayBuffer(1000, SPEC, seed=0)
    lengths = [5, 9, 1, 30, 12]
    for ep, length in enumerate(lengths):
        buf.add_episode(_episode(ep, length))
    seg = buf.sample(57_000, 6, pad=True)
    counts = _padded_starts(seg, {ep: list(range(n)) for ep, n in enumerate(lengths)})
    assert set(counts) == {(ep, t) for ep, n in enumerate(lengths) for t in range(n)}  # all 57 stored steps
    assert all(850 < c < 1150 for c in counts.values())  # 1000 expected, sd ~31
    terminal_at = np.argwhere(seg["is_terminal"] & seg["valid"])[:, 1]
    assert set(terminal_at.tolist()) == set(range(6))
    valid_steps = Counter(map(tuple, seg["tag"][seg["valid"]].tolist()))
    assert valid_steps[(3, 29)] > 0.9 * valid_steps[(3, 15)]  # episode 3's end is replayed as often as its middle
    unpadded = buf.sample(6000, 6)
    assert "valid" not in unpadded and set(np.argwhere(unpadded["is_terminal"])[:, 1].tolist()) == {5}


def test_eviction_keeps_only_stored_tails():
    buf = ReplayBuffer(20, SPEC, seed=1)
    for ep in range(5):  # 40 steps into 20: episodes 0, 1 and the head of 2 are overwritten
        buf.add_episode(_episode(ep, 8))
    assert len(buf) == 20 and buf.steps_added == 40 and buf.num_episodes == 3
    stored = {2: list(range(4, 8)), 3: list(range(8)), 4: list(range(8))}
    assert _starts(buf.sample(4000, 4)) == _valid_starts(stored, 4)  # includes episode 2's tail (2, 4)
    assert _starts(buf.sample(4000, 5)) == _valid_starts(stored, 5)  # its tail is too short now
    buf.add_episode(_episode(5, 50))  # longer than the ring: only its newest 20 steps stay
    assert len(buf) == 20 and buf.num_episodes == 1 and buf.steps_added == 90
    assert _starts(buf.sample(2000, 20)) == {(5, 30)}


@pytest.mark.parametrize("capacity", [7, 40, 1000])
def test_interleaved_workers_with_eviction(capacity):
    """Three workers' steps arrive interleaved; worker 0 runs long episodes, the others short ones."""
    rng = np.random.default_rng(capacity)
    buf = ReplayBuffer(capacity, SPEC, seed=2)
    arrivals = []  # (episode, t) in ring order
    running = {}  # worker -> [episode, t, length]
    next_ep = 0
    for i in range(600):
        w = int(rng.integers(3))
        if w not in running:
            running[w] = [next_ep, 0, int(rng.integers(60, 150) if w == 0 else rng.integers(1, 12))]
            next_ep += 1
        ep, t, length = running[w]
        buf.add(_step(ep, t, last=t == length - 1), worker=w)
        arrivals.append((ep, t))
        running[w][1] += 1
        if t == length - 1:
            del running[w]
        if i % 100 == 99:
            stored = {}
            for e, s in arrivals[-capacity:]:
                stored.setdefault(e, []).append(s)
            assert len(buf) == min(i + 1, capacity) and buf.steps_added == i + 1
            assert buf.num_episodes == len(stored)
            for length in (1, 3):
                valid = _valid_starts(stored, length)
                if not valid:
                    with pytest.raises(ValueError, match="no segment"):
                        buf.sample(1, length)
                    continue
                assert _starts(buf.sample(20 * len(valid), length)) == valid  # misses one w.p. ~e^-20


def test_short_episodes_are_skipped_and_nothing_long_enough_is_an_error():
    buf = ReplayBuffer(50, SPEC)
    with pytest.raises(ValueError, match="0 steps stored"):
        buf.sample(1, 1)
    buf.add_episode(_episode(0, 2))
    buf.add_episode(_episode(1, 3))
    assert _starts(buf.sample(200, 3)) == {(1, 0)}
    with pytest.raises(ValueError, match=r"no segment of 4 steps: 5 steps stored, longest stored episode has 3"):
        buf.sample(8, 4)


def dataset_buffer(root, capacity, seed=0):
    """A replay buffer holding an episode dataset's episodes, in file order."""
    keys = ("image", "stats", *STEP_KEYS)
    buf = ReplayBuffer(capacity, {"image": ((4, 4, 3), np.uint8), "stats": ((3,), np.float32)}, seed=seed)
    for episode in iter_episodes(root, keys=keys):
        buf.add_episode(episode)
    return buf


def test_an_episode_dataset_replays_whole(tmp_path):
    w = EpisodeWriter(tmp_path, {"env": "toy", "obs_keys": ["image", "stats"], "num_actions": 3})
    obs = lambda env, t: {"image": np.full((4, 4, 3), t, np.uint8),  # noqa: E731
                          "stats": np.array([env, t, 0.5], np.float32)}
    w.begin(0, obs(0, 0))
    w.begin(1, obs(1, 0))
    for t in range(1, 9):  # env 0: an episode of 5, then a cut piece of 4; env 1: a cut piece of 9
        if t < 5:
            w.step(0, obs(0, t), 1, 0.0, t == 4, False)
        elif t == 5:
            w.begin(0, obs(2, 0))
        else:
            w.step(0, obs(2, t - 5), 1, 0.0, False, False)
        w.step(1, obs(1, t), 2, 1.0, False, False)
    w.flush()
    buf = dataset_buffer(tmp_path, 18)
    assert len(buf) == w.frames == 5 + 4 + 9 and buf.num_episodes == 3
    assert buf.spec["stats"] == ((3,), np.float32) and buf.spec["image"] == ((4, 4, 3), np.uint8)
    seg = buf.sample(500, 4)
    stats = seg["stats"]  # b t 3
    assert (stats[:, :, 0] == stats[:, :1, 0]).all() and (np.diff(stats[:, :, 1], axis=1) == 1).all()
    np.testing.assert_array_equal(seg["image"][:, :, 0, 0, 0], stats[:, :, 1])
    assert {(int(e), int(t)) for e, t in stats[:, 0, :2]} == {(0, 0), (0, 1), (2, 0)} | {(1, t) for t in range(6)}
    small = dataset_buffer(tmp_path, 6)
    assert len(small) == 6 and small.steps_added == 18


def _online(buf: ReplayBuffer, steps: range) -> None:
    """Two workers: worker 0 runs episodes of 13 steps, worker 1 one long episode (in progress at the end)."""
    for i in steps:
        buf.add(_step(i // 13, i % 13, last=i % 13 == 12), worker=0)
        buf.add(_step(1000, i), worker=1)


def test_save_load_resumes_exactly(tmp_path):
    buf = ReplayBuffer(100, SPEC, seed=5)
    buf.add_episode(_episode(500, 40))
    _online(buf, range(70))  # 180 steps into 100: evicted heads, both workers mid-episode
    buf.sample(4, 5)
    path = tmp_path / "replay.npz"
    buf.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["replay.npz"]
    back = ReplayBuffer.load(path)
    assert (len(back), back.num_episodes, back.steps_added, back.capacity) == (100, 6, 180, 100)
    assert back.spec == buf.spec
    for k in buf.data:
        np.testing.assert_array_equal(back.data[k], buf.data[k])
    for a, b in [(buf, back)] * 3:
        sa, sb = a.sample(16, 5), b.sample(16, 5)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k])
    _online(buf, range(70, 90))  # the workers' episodes continue across the save
    _online(back, range(70, 90))
    sa, sb = buf.sample(64, 12), back.sample(64, 12)
    _starts(sb)
    np.testing.assert_array_equal(sa["tag"], sb["tag"])
    assert _starts(back.sample(500, 30)) == {(1000, t) for t in range(40, 61)}  # stored: 40..89


def _as_numpy(v):
    return v.numpy() if isinstance(v, torch.Tensor) else v


def _assert_same_buffer(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert (len(a), a.num_episodes, a.steps_added, a.capacity) == (len(b), b.num_episodes, b.steps_added, b.capacity)
    for k in a.data:
        np.testing.assert_array_equal(_as_numpy(a.data[k]), _as_numpy(b.data[k]))
    sa, sb = a.sample(32, 5, rng=np.random.default_rng(0)), b.sample(32, 5, rng=np.random.default_rng(0))
    for k in sa:
        np.testing.assert_array_equal(_as_numpy(sa[k]), _as_numpy(sb[k]))
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


@pytest.mark.parametrize("device", [None, "cpu"])
def test_chunked_saves_write_only_new_steps_and_resume_exactly(tmp_path, device):
    """Checkpoint saves (`chunks=`) write only the steps new since the last one, split at the ring's wrap, and
    stop naming chunks whose steps are all overwritten. The latest state file, with every other file deleted,
    loads the same buffer as a self-contained save, and a loaded buffer goes on saving chunks."""
    buf = ReplayBuffer(100, SPEC, seed=5, device=device)
    buf.add_episode(_episode(500, 40))
    expected = [[(0, 80)], [(80, 100), (100, 110)], [(110, 112)], [], [(180, 200), (200, 280)]]
    for i, (lo, hi) in enumerate([(0, 20), (20, 35), (35, 36), (36, 36), (36, 120)]):
        _online(buf, range(lo, hi))  # two steps each
        before = {p.name for p in tmp_path.iterdir()}
        needed = buf.save(tmp_path / f"state{i}.npz", chunks="rank0")
        new = sorted(p.name for p in tmp_path.iterdir() if p.name not in before and p.name != f"state{i}.npz")
        assert [tuple(int(x) for x in n[:-4].split("-")[2:]) for n in new] == expected[i]
        assert needed[0] == f"state{i}.npz" and set(new) <= set(needed)
        for p in tmp_path.iterdir():  # what the trainer's cleanup does after a checkpoint
            if p.name not in needed:
                p.unlink()
        buf.save(tmp_path / "whole.npz")
        _assert_same_buffer(ReplayBuffer.load(tmp_path / f"state{i}.npz", device), ReplayBuffer.load(tmp_path / "whole.npz"))
        (tmp_path / "whole.npz").unlink()
    assert len(needed) == 3  # the 280 steps written: only the last 100 are live, in the last two chunks
    back = ReplayBuffer.load(tmp_path / "state4.npz", device)
    _online(back, range(120, 125))
    _online(buf, range(120, 125))
    needed = back.save(tmp_path / "state5.npz", chunks="rank0")
    assert needed[1:3] == [n for n in needed if n.endswith("000000000180-000000000200.npz") or
                           n.endswith("000000000200-000000000280.npz")]  # the loaded chunks, then the new one
    assert needed[3].endswith("000000000280-000000000290.npz")
    _assert_same_buffer(ReplayBuffer.load(tmp_path / "state5.npz", device), buf)
    merged = ReplayBuffer.merged([back], 100)
    assert all(back._lineage not in n for n in merged.save(tmp_path / "m.npz", chunks="rank0")[1:])
    raw = (tmp_path / needed[1]).read_bytes()
    (tmp_path / needed[1]).write_bytes(raw[:len(raw) // 2])  # a chunk cut short names itself
    with pytest.raises(DataError, match=f"not a readable replay buffer.*its chunk .*{needed[1]} is missing or damaged"):
        ReplayBuffer.load(tmp_path / "state5.npz")
    (tmp_path / needed[1]).unlink()
    with pytest.raises(DataError, match=f"not a readable replay buffer.*its chunk .*{needed[1]} is missing or damaged"):
        ReplayBuffer.load(tmp_path / "state5.npz")


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, SPEC)
    buf = ReplayBuffer(10, SPEC)
    step = _step(0, 0)
    with pytest.raises(ValueError, match=r"missing \['tag'\]"):
        buf.add({k: v for k, v in step.items() if k != "tag"})
    with pytest.raises(ValueError, match=r"'image': expected shape \(2, 2, 3\), got \(2, 2\)"):
        buf.add({**step, "image": np.zeros((2, 2), np.uint8)})
    with pytest.raises(ValueError, match="'image': expected uint8 values, got float32"):
        buf.add({**step, "image": np.zeros((2, 2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'image': expected shape \(t, 2, 2, 3\)"):
        buf.add_episode({**_episode(0, 3), "image": np.zeros((3, 4, 4, 3), np.uint8)})
    assert len(buf) == 0 and buf.steps_added == 0
    with pytest.raises(FileNotFoundError, match="no replay buffer file"):
        ReplayBuffer.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable replay buffer"):
        ReplayBuffer.load(tmp_path / "bad.npz")
    buf.add(step)
    buf.save(tmp_path / "ok.npz")
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="not a readable replay buffer"):
        ReplayBuffer.load(tmp_path / "cut.npz")


def test_merged_holds_every_episode_of_its_shards():
    spec = {"image": ((2,), np.uint8)}
    a, b = ReplayBuffer(50, spec, seed=0), ReplayBuffer(50, spec, seed=1)
    for buf, base, n in ((a, 0, 7), (b, 100, 5)):
        for i in range(n):  # one finished 4-step episode, then one in progress
            buf.add({"image": np.full(2, base + i, np.uint8), "action": i, "reward": 1.0, "is_first": i in (0, 4),
                     "is_last": i == 3, "is_terminal": i == 3})
    merged = ReplayBuffer.merged([a, b], capacity=100, seed=3)
    assert len(merged) == 12 and merged.num_episodes == 4
    episodes = [ep["image"][:, 0].tolist() for ep in merged.episodes()]
    assert episodes == [[0, 1, 2, 3], [4, 5, 6], [100, 101, 102, 103], [104]]
    segments = merged.sample(8, 3)["image"][..., 0]
    assert all(list(s) in ([0, 1, 2], [1, 2, 3], [4, 5, 6], [100, 101, 102], [101, 102, 103]) for s in segments)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        va = a[k].cpu().numpy() if isinstance(a[k], torch.Tensor) else a[k]
        vb = b[k].cpu().numpy() if isinstance(b[k], torch.Tensor) else b[k]
        assert va.dtype == vb.dtype, k
        np.testing.assert_array_equal(va, vb)


def _rows(steps: list[dict]) -> dict:
    return {k: np.stack([np.asarray(s[k]) for s in steps]) for k in steps[0]}


def test_add_steps_is_sequential_add_in_row_order(tmp_path):
    """Three workers' steps added one call per env step equal the same steps added one by one: the same stored
    steps, episodes and bookkeeping, so the same samples; through eviction (capacity 23) and a repeated worker."""
    one, many = ReplayBuffer(23, SPEC, seed=9), ReplayBuffer(23, SPEC, seed=9)
    lengths = {0: 5, 1: 11, 2: 3}
    for i in range(40):
        rows = [(w, _step(100 * w + i // lengths[w], i % lengths[w], last=i % lengths[w] == lengths[w] - 1))
                for w in (2, 0, 1)]
        if i == 20:
            rows.append((5, _step(999, 0)))  # a one-step worker
        for w, step in rows:
            one.add(step, worker=w)
        many.add_steps(_rows([s for _, s in rows]), [w for w, _ in rows])
        if i % 13 == 12:
            _same(one.sample(32, 2), many.sample(32, 2))
    one.save(tmp_path / "one.npz")
    many.save(tmp_path / "many.npz")
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "many.npz") as b:
        _same(dict(a), dict(b))
    with pytest.raises(ValueError, match="2 steps for 1 workers"):
        many.add_steps(_rows([_step(0, 0), _step(1, 0)]), [0])
    with pytest.raises(ValueError, match="exceed the capacity of 23"):
        many.add_steps(_rows([_step(0, 0)] * 24), range(24))


def test_device_storage_draws_the_same_segments_as_host_storage(tmp_path, monkeypatch):
    """Steps kept as torch tensors (here on the CPU device; on a GPU the same code keeps them in its memory)
    store, evict, sample, merge and save exactly like the numpy ring, and each storage loads the other's file."""
    host, dev = ReplayBuffer(60, SPEC, seed=4), ReplayBuffer(60, SPEC, seed=4, device="cpu")
    for buf in (host, dev):
        buf.add_episode(_episode(500, 25))
        _online(buf, range(50))  # 125 steps into 60: evictions, two workers mid-episode
    assert isinstance(dev.data["image"], torch.Tensor) and dev.data["image"].dtype == torch.uint8
    sample = dev.sample(16, 5)
    assert isinstance(sample["tag"], torch.Tensor) and sample["is_first"].dtype == torch.bool
    _same(host.sample(16, 5), sample)
    _starts({k: v.numpy() for k, v in dev.sample(64, 7).items()})
    host.sample(64, 7)
    padded = dev.sample(64, 30, pad=True)
    assert padded["valid"].dtype == torch.bool and not padded["valid"].all()
    _same(host.sample(64, 30, pad=True), padded)
    for a, b in zip(host.episodes(), dev.episodes()):
        _same(a, b)
    _same(ReplayBuffer.merged([host], 100, seed=1).sample(8, 4),
          ReplayBuffer.merged([dev], 100, seed=1, device="cpu").sample(8, 4))
    import agent.replay

    monkeypatch.setattr(agent.replay, "SAVE_CHUNK_BYTES", 100)  # the 12-byte images go to the file 8 rows at a time
    dev.save(tmp_path / "dev.npz")
    host.save(tmp_path / "host.npz")
    with np.load(tmp_path / "dev.npz") as a, np.load(tmp_path / "host.npz") as b:
        assert a.files == b.files
        _same({k: a[k] for k in a.files if k != "meta"}, {k: b[k] for k in b.files if k != "meta"})
    back_host, back_dev = ReplayBuffer.load(tmp_path / "dev.npz"), ReplayBuffer.load(tmp_path / "host.npz", "cpu")
    assert back_host.device is None and back_dev.device == torch.device("cpu")
    for a, b in ((host, back_dev), (dev, back_host), (back_host, back_dev)):
        _same(a.sample(16, 6), b.sample(16, 6))


def test_a_step_layout_the_sampler_would_misread_is_refused():
    spec = {"image": ((2,), np.uint8)}
    with pytest.raises(ValueError, match="'valid' is a replay sample's own key"):
        ReplayBuffer(10, {"valid": ((1,), np.uint8)})
    with pytest.raises(ValueError, match="whole number of steps"):
        ReplayBuffer(5.5, spec)
    buf = ReplayBuffer(10, spec)
    with pytest.raises(ValueError, match="a terminal step must also be the episode's last"):
        buf.add({"image": np.zeros(2, np.uint8), "action": 0, "reward": 0.0, "is_first": True, "is_last": False,
                 "is_terminal": True})
    assert len(buf) == 0


def test_a_step_after_an_episode_end_starts_a_new_episode_even_without_is_first():
    """`add`: is_first, OR no episode open for the worker, starts an episode; is_last closes it. So worker 0's steps
    0..2 (step 2 is_last) then 3, 4 (is_first never set) are two episodes, and a segment never spans 2 -> 3."""
    from agent.replay import ReplayBuffer

    buf = ReplayBuffer(20, {"image": ((1,), np.uint8)})
    for i in range(5):
        buf.add({"image": np.array([i], np.uint8), "action": 0, "reward": 0.0, "is_first": i == 0,
                 "is_last": i == 2, "is_terminal": i == 2})
    assert [ep["image"][:, 0].tolist() for ep in buf.episodes()] == [[0, 1, 2], [3, 4]]
    assert buf.num_episodes == 2 and buf.longest_episode() == 3


def _ep(values):
    n = len(values)
    return {"image": np.array(values, np.uint8)[:, None], "action": np.zeros(n, np.int64),
            "reward": np.zeros(n, np.float32), "is_first": np.arange(n) == 0, "is_last": np.arange(n) == n - 1,
            "is_terminal": np.zeros(n, bool)}


def test_a_loaded_buffer_reuses_the_slots_eviction_freed_and_lists_episodes_oldest_first(tmp_path):
    """Capacity 6: A (3 steps), B (3), then C (3) evicts A, whose slot is freed; the buffer is saved and loaded
    there. D (2 steps) then takes A's freed slot in both and evicts B's first two steps, so the loaded buffer
    draws the same segments as the one that never stopped, and episodes() lists B's tail, C, D (oldest first,
    not slot order: D sits in slot 0)."""
    spec = {"image": ((1,), np.uint8)}
    buf = ReplayBuffer(6, spec, seed=0)
    for values in ([0, 1, 2], [10, 11, 12], [20, 21, 22]):
        buf.add_episode(_ep(values))
    buf.save(tmp_path / "r.npz")
    back = ReplayBuffer.load(tmp_path / "r.npz")
    for b in (buf, back):
        b.add_episode(_ep([30, 31]))
        assert [ep["image"][:, 0].tolist() for ep in b.episodes()] == [[12], [20, 21, 22], [30, 31]]
    for length in (1, 2):
        a = buf.sample(32, length, rng=np.random.default_rng(length))
        b = back.sample(32, length, rng=np.random.default_rng(length))
        np.testing.assert_array_equal(a["image"], b["image"])


def test_a_chunk_whose_steps_are_all_overwritten_is_no_longer_needed(tmp_path):
    """Capacity 10: the first checkpoint writes chunk [0, 10); 10 more steps overwrite all of it, so the next
    checkpoint needs only itself and chunk [10, 20) (the trainer deletes the rest), and loads whole from them."""
    spec = {"image": ((1,), np.uint8)}
    buf = ReplayBuffer(10, spec, seed=0)
    buf.add_episode(_ep(list(range(10))))
    first = buf.save(tmp_path / "s0.npz", chunks="rank0")
    assert [n.split("-", 2)[2] for n in first[1:]] == ["000000000000-000000000010.npz"]
    buf.add_episode(_ep(list(range(100, 110))))
    needed = buf.save(tmp_path / "s1.npz", chunks="rank0")
    assert needed[0] == "s1.npz" and [n.split("-", 2)[2] for n in needed[1:]] == ["000000000010-000000000020.npz"]
    for p in tmp_path.iterdir():
        if p.name not in needed:
            p.unlink()
    back = ReplayBuffer.load(tmp_path / "s1.npz")
    assert [ep["image"][:, 0].tolist() for ep in back.episodes()] == [list(range(100, 110))]


def test_is_first_starts_a_new_episode_even_while_one_is_open():
    """A worker whose episode was never closed (a collector reset mid-episode) and that sends is_first: two
    episodes, and no segment spans the cut."""
    buf = ReplayBuffer(20, {"image": ((1,), np.uint8)})
    for value, first in ((0, True), (1, False), (2, False), (100, True), (101, False)):
        buf.add({"image": np.array([value], np.uint8), "action": 0, "reward": 0.0, "is_first": first,
                 "is_last": False, "is_terminal": False})
    assert [ep["image"][:, 0].tolist() for ep in buf.episodes()] == [[0, 1, 2], [100, 101]]
    segments = buf.sample(64, 2, rng=np.random.default_rng(0))["image"][..., 0].tolist()
    assert [2, 100] not in segments and {tuple(s) for s in segments} == {(0, 1), (1, 2), (100, 101)}
