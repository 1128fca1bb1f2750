"""ResilientVectorEnv: same results as SyncVectorEnv, and worker crashes end episodes, not runs."""
import multiprocessing as mp
import os
import signal
import time
import warnings
from functools import partial

import gymnasium
import numpy as np
import pytest
from gymnasium.spaces import Box, Dict, Discrete
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from envs.throughput import measure_independent_steps_per_second, measure_steps_per_second
from envs.vector import ResilientVectorEnv, _alive, _Readiness, make_vector_env


class CounterEnv(gymnasium.Env):
    """Toy env whose (4, 4, 3) uint8 obs encodes (episode base, step, last action); random lengths.

    ``fail_at`` ("reset" or a step count over the env's life) makes it fail with ``fail_mode``
    ("raise", "exit" the process, or "hang"); only once per test when ``fail_once`` names a file.
    """

    action_space = Discrete(3)

    def __init__(self, dict_obs=False, fail_at=None, fail_mode="raise", fail_once=None):
        image = Box(0, 255, (4, 4, 3), np.uint8)
        self.observation_space = Dict(image=image, stats=Box(-10, 10, (2,), np.float32)) if dict_obs else image
        self.dict_obs = dict_obs
        self.fail_at, self.fail_mode, self.fail_once = fail_at, fail_mode, fail_once
        self.total = 0

    def _maybe_fail(self, when):
        if when != self.fail_at or (self.fail_once and os.path.exists(self.fail_once)):
            return
        if self.fail_once:
            open(self.fail_once, "w").close()
        if self.fail_mode == "exit":
            os._exit(3)
        if self.fail_mode == "hang":
            time.sleep(600)
        raise ValueError("boom: injected env failure")

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._maybe_fail("reset")
        self.length = int(self.np_random.integers(2, 9))
        self.base = int(self.np_random.integers(0, 200))
        self.t = 0
        return self._obs(0), {"base": self.base}

    def step(self, action):
        self.t += 1
        self.total += 1
        self._maybe_fail(self.total)
        done = self.t >= self.length
        term, trunc = done and self.length % 2 == 0, done and self.length % 2 == 1
        return self._obs(int(action) + 1), float(self.t + int(action)), term, trunc, {"t": self.t}

    def _obs(self, last_action):
        image = np.zeros((4, 4, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = self.base, self.t, last_action
        if self.dict_obs:
            return {"image": image, "stats": np.array([self.t, last_action], np.float32)}
        return image


ACTIONS = np.random.default_rng(0).integers(0, 3, (50, 4))  # (steps, num_envs)


def run(venv, actions=ACTIONS, seed=0):
    """Reset with ``seed``, then step with ``actions``: list of (obs, r, term, trunc, info) per call."""
    return [venv.reset(seed=seed)] + [venv.step(a) for a in actions]


def sync_run(env_fn, actions=ACTIONS):
    venv = SyncVectorEnv([env_fn] * actions.shape[1], autoreset_mode=AutoresetMode.NEXT_STEP)
    out = run(venv, actions)
    venv.close()
    return out


def assert_obs_equal(a, b, idx=slice(None)):
    if isinstance(a, dict):
        for key in a:
            np.testing.assert_array_equal(a[key][idx], b[key][idx])
    else:
        np.testing.assert_array_equal(a[idx], b[idx])


def assert_same_step(got, ref, idx=None):
    """Same reset/step results; with env mask ``idx``, only obs, rewards, terminations, truncations there."""
    if idx is not None:
        assert_obs_equal(got[0], ref[0], idx)
        for x, y in zip(got[1:4], ref[1:4], strict=True):
            np.testing.assert_array_equal(x[idx], y[idx])
        return
    assert_obs_equal(got[0], ref[0])
    for x, y in zip(got[1:-1], ref[1:-1], strict=True):
        np.testing.assert_array_equal(x, y)
    assert got[-1].keys() == ref[-1].keys()
    for key in got[-1]:
        np.testing.assert_array_equal(got[-1][key], ref[-1][key])


@pytest.mark.parametrize("envs_per_worker,shared_memory", [(1, True), (2, True), (2, False)])
def test_matches_sync_vector_env(envs_per_worker, shared_memory):
    venv = ResilientVectorEnv([CounterEnv] * 4, envs_per_worker=envs_per_worker, shared_memory=shared_memory)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert venv.observation_space.shape == (4, 4, 4, 3) and venv.action_space.shape == (4,)
    got = run(venv)
    venv.close()
    ref = sync_run(CounterEnv)
    for g, r in zip(got, ref, strict=True):
        assert_same_step(g, r)
    assert any(r[2].any() for r in ref[1:]) and any(r[3].any() for r in ref[1:])  # autoresets covered


def test_dict_observations():
    env_fn = partial(CounterEnv, dict_obs=True)
    venv = ResilientVectorEnv([env_fn] * 4, envs_per_worker=2)
    got = run(venv, ACTIONS[:20])
    venv.close()
    assert got[-1][0]["image"].shape == (4, 4, 4, 3) and got[-1][0]["stats"].shape == (4, 2)
    for g, r in zip(got, sync_run(env_fn, ACTIONS[:20]), strict=True):
        assert_same_step(g, r)


def check_recovery(venv, ref, crash_at, failed, match, timeout=60.0):
    """Step ``venv`` (reset, ``crash_at`` steps done) through ACTIONS[crash_at:] expecting worker
    ``failed``'s envs to be truncated at the first of them and fresh at the next; others match ``ref``.
    ``timeout`` is the step_timeout of the failing step only (later ones start a worker)."""
    sl = slice(failed * venv.envs_per_worker, (failed + 1) * venv.envs_per_worker)
    ok = np.ones(venv.num_envs, bool)
    ok[sl] = False
    venv.step_timeout, default_timeout = timeout, venv.step_timeout
    with pytest.warns(RuntimeWarning, match=match):
        obs, rew, term, trunc, info = venv.step(ACTIONS[crash_at])
    venv.step_timeout = default_timeout
    assert venv.restarts == 1
    assert_same_step((obs, rew, term, trunc, info), ref[crash_at + 1], ok)
    assert_obs_equal(obs, ref[crash_at][0], sl)  # last observation (still as in ref) repeated
    assert trunc[sl].all() and not term[sl].any() and not rew[sl].any()
    np.testing.assert_array_equal(info["worker_restarted"], ~ok)
    np.testing.assert_array_equal(info["_worker_restarted"], ~ok)
    obs, rew, term, trunc, info = venv.step(ACTIONS[crash_at + 1])  # fresh episodes
    image = obs["image"] if isinstance(obs, dict) else obs
    assert not image[sl][..., 1:].any()  # step counter and last action 0: a first observation
    assert not rew[sl].any() and not term[sl].any() and not trunc[sl].any()
    assert_same_step((obs, rew, term, trunc, info), ref[crash_at + 2], ok)
    for t in range(crash_at + 2, crash_at + 22):
        assert_same_step(venv.step(ACTIONS[t]), ref[t + 1], ok)
    assert venv.restarts == 1


PROBE = """
import os
import signal

import gymnasium

from envs.vector import ResilientVectorEnv


def ctrl_c_ignored() -> bool:
    with open("/proc/self/status") as status:
        ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & 1 << (signal.SIGINT - 1))


def make():
    return gymnasium.make("CartPole-v1")


if __name__ == "__mp_main__":  # the fork server importing this script, before it ignores Ctrl-C itself
    print("server", ctrl_c_ignored(), flush=True)
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, however the suite was started
    venv = ResilientVectorEnv([make], context="forkserver")
    venv.reset(seed=0)  # the worker is up, so the server has imported its preload
    print("run", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
    venv.close()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or "forkserver" not in mp.get_all_start_methods(),
                    reason="reads signal dispositions from Linux's /proc")
def test_the_fork_server_imports_with_ctrl_c_ignored(tmp_path):
    """A terminal's Ctrl-C reaches every process of the run: in the run's first second the fork server is still
    importing its preload modules (before it ignores Ctrl-C itself), where Ctrl-C killed it with a traceback over the
    run's message. It starts with Ctrl-C ignored now, and the run's own handler is back once it is started."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "probe.py").write_text(PROBE)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(tmp_path / "probe.py")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)}, cwd=tmp_path)
    assert sorted(out.stdout.split("\n"))[1:] == ["run True", "server True"], out.stdout + out.stderr


def test_a_worker_leaves_sigterm_to_the_run():
    """SIGTERM to the whole process group (a scheduler, torchrun): the run finishes its step, which steps the envs, so
    the workers ignore it instead of dying under that step."""
    venv = ResilientVectorEnv([CounterEnv] * 4, envs_per_worker=2)
    ref = sync_run(CounterEnv)
    got = run(venv, ACTIONS[:3])
    for pid in venv.worker_pids:
        os.kill(pid, signal.SIGTERM)
    got += [venv.step(a) for a in ACTIONS[3:6]]
    for g, r in zip(got, ref):
        assert_same_step(g, r)
    assert venv.restarts == 0
    venv.close()


def test_killed_worker_is_restarted():
    venv = ResilientVectorEnv([CounterEnv] * 4, envs_per_worker=2)  # worker 1 holds envs 2, 3
    ref = sync_run(CounterEnv)
    for g, r in zip(run(venv, ACTIONS[:5]), ref):
        assert_same_step(g, r)
    old_pid = venv.worker_pids[1]
    os.kill(old_pid, signal.SIGKILL)
    check_recovery(venv, ref, crash_at=5, failed=1, match="died")
    assert venv.worker_pids[1] != old_pid
    venv.close()


@pytest.mark.nethack
def test_an_action_out_of_range_is_the_callers_error_not_a_crash():
    """The vector env refuses actions outside the action space before sending them (a worker would raise, be taken
    for a crash and restarted); the games refuse them too, in one line."""
    from envs.crafter import CrafterEnv
    from envs.nethack import NetHackEnv

    venv = ResilientVectorEnv([CounterEnv] * 2)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions \[99  0\] are not one per env of Discrete"):
        venv.step(np.array([99, 0]))
    with pytest.raises(ValueError, match=r"actions \[1.5 0. \] are not one per env"):  # MultiDiscrete takes 1.5
        venv.step(np.array([1.5, 0.0]))
    venv.step(np.array([1, 0]))
    assert venv.restarts == 0
    venv.close()
    for env, n in ((CrafterEnv(), 17), (NetHackEnv(), 23)):
        env.reset(seed=0)
        with pytest.raises(ValueError, match=f"action {n} is not in the action space Discrete\\({n}\\)"):
            env.step(n)
        env.step(np.int64(n - 1))
        env.close()


@pytest.mark.parametrize(
    "mode,match", [("raise", "boom: injected env failure"), ("exit", "died"), ("hang", "step_timeout")]
)
def test_failing_env_is_restarted(tmp_path, mode, match):
    fns = [CounterEnv] * 4
    fns[2] = partial(CounterEnv, fail_at=6, fail_mode=mode, fail_once=str(tmp_path / "failed"))
    venv = ResilientVectorEnv(fns)
    ref = sync_run(CounterEnv)
    for g, r in zip(run(venv, ACTIONS[:5]), ref):
        assert_same_step(g, r)
    check_recovery(venv, ref, crash_at=5, failed=2, match=match, timeout=1.0)
    venv.close()


def test_failed_reset_is_retried(tmp_path):
    fns = [CounterEnv] * 4
    fns[1] = partial(CounterEnv, fail_at="reset", fail_once=str(tmp_path / "failed"))
    venv = ResilientVectorEnv(fns, envs_per_worker=2)
    with pytest.warns(RuntimeWarning, match="boom"):
        got = run(venv, ACTIONS[:10])
    venv.close()
    assert venv.restarts == 1
    for g, r in zip(got, sync_run(CounterEnv, ACTIONS[:10]), strict=True):
        assert_same_step(g, r)


def test_crash_loop_raises_but_rare_crashes_of_a_long_run_do_not():
    """The cap counts the restarts of the last restart_window steps: a worker failing at once after each restart
    gives up; one failing every 10 steps of its life goes on past max_restarts in all."""
    venv = ResilientVectorEnv([partial(CounterEnv, fail_at=1)] * 2, max_restarts=2, restart_window=20)
    venv.reset(seed=0)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="2 restarts within 20 steps; giving up"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(10):
            venv.step(np.zeros(2, dtype=np.int64))
    venv.close()
    venv = ResilientVectorEnv([partial(CounterEnv, fail_at=10)], max_restarts=1, restart_window=8)
    venv.reset(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(60):
            venv.step(np.zeros(1, dtype=np.int64))
    assert venv.restarts >= 4  # each alone in its window
    venv.close()


def test_close_is_idempotent_and_reaps_workers():
    venv = make_vector_env(CounterEnv, 4, envs_per_worker=2)
    assert isinstance(venv, ResilientVectorEnv)
    print(f"\ntoy env throughput: {measure_steps_per_second(venv, 200):.0f} env steps/s")
    pids = venv.worker_pids
    venv.close()
    venv.close()
    assert venv.closed and not mp.active_children()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    venv = make_vector_env(CounterEnv, 2)
    del venv  # __del__ closes
    assert not mp.active_children()


def test_make_vector_env_sync():
    venv = make_vector_env(CounterEnv, 3, asynchronous=False)
    assert isinstance(venv, SyncVectorEnv) and venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    venv.close()


def test_independent_processes_rate(tmp_path):
    """The no-IPC ceiling of bench envs: a finite rate from processes that each step their own envs; a process
    whose env fails gives an error, not a hang."""
    rate = measure_independent_steps_per_second(CounterEnv, 2, 50, envs_per_process=2)
    assert 0 < rate < float("inf")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="measuring process failed"):
        measure_independent_steps_per_second(partial(CounterEnv, fail_at="reset"), 2, 50)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("poll", [True, False], ids=["select.poll", "wait"])
def test_replies_are_returned_once_each_as_they_arrive(monkeypatch, poll):
    """The exchange's readiness: readable connections come back once each, a hung-up worker's too, [] on timeout;
    with select.poll and with multiprocessing's wait where poll is missing."""
    import select

    if not poll:
        monkeypatch.delattr(select, "poll")
    pairs = [mp.Pipe() for _ in range(3)]
    ready = _Readiness([parent for parent, _ in pairs])
    assert ready.wait(0) == []
    pairs[2][1].send("reply")
    pairs[0][1].send("reply")
    got = ready.wait(1.0)
    assert {id(c) for c in got} <= {id(pairs[0][0]), id(pairs[2][0])} and got
    got += ready.wait(1.0) if len(got) < 2 else []
    assert sorted(id(c) for c in got) == sorted([id(pairs[0][0]), id(pairs[2][0])])
    assert ready.wait(0) == []  # replies are not read here, yet each connection comes back once
    pairs[1][1].close()  # the last worker hangs up
    assert ready.wait(1.0) == [pairs[1][0]]
    with pytest.raises(EOFError):
        pairs[1][0].recv()


def test_bad_args():
    with pytest.raises(ValueError, match="multiple of envs_per_worker"):
        ResilientVectorEnv([CounterEnv] * 3, envs_per_worker=2)


def _assert_infos_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, dict):
            _assert_infos_equal(got[key], value)
        else:
            assert got[key].dtype == value.dtype, key
            if value.dtype == object:  # e.g. final_obs: arrays or None per env
                assert [None if v is None else np.asarray(v).tolist() for v in got[key]] == [
                    None if v is None else np.asarray(v).tolist() for v in value], key
            else:
                np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_worker_side_info_batching_matches_per_env_batching():
    """Workers batch their envs' infos and the parent merges one dict per worker: the same vector infos as
    gymnasium's per-env _add_info over all envs (keys some envs lack, nested dicts, arrays, objects, a key first
    seen in a later worker, an int key that a later env gives as a float)."""
    from envs.infos import InfoBatcher, merge_infos

    env_infos = [
        {"score": 1, "episode": {"r": 1.5, "l": 10}, "final_obs": np.ones(2)},
        {},
        {"score": 2, "flags": np.array([1, 0], np.int8)},
        {"late": "x", "score": 3.7},
        {"episode": {"r": -1.0}},
        {"late": "y", "flags": np.array([0, 1], np.int8)},
    ]
    want: dict = {}
    everything = InfoBatcher(6)
    for i, info in enumerate(env_infos):
        want = everything._add_info(want, info, i)
    got: dict = {}
    for w in range(3):  # 3 workers x 2 envs
        part, batcher = {}, InfoBatcher(2)
        for j, info in enumerate(env_infos[2 * w:2 * w + 2]):
            part = batcher._add_info(part, info, j)
        got = merge_infos(got, part, slice(2 * w, 2 * w + 2), 6)
    _assert_infos_equal(got, want)
    assert got["score"].dtype == np.int64 and got["score"][3] == 3  # typed by the first env, as gymnasium
    assert got["final_obs"][0] is not None and got["final_obs"][1] is None


def _worker_parts(env_infos: list, per_worker: int) -> list:
    from envs.infos import InfoBatcher

    parts = []
    for start in range(0, len(env_infos), per_worker):
        part, batcher = {}, InfoBatcher(per_worker)
        for j, info in enumerate(env_infos[start:start + per_worker]):
            part = batcher._add_info(part, info, j)
        parts.append(part)
    return parts


@pytest.mark.parametrize("case", ["same layout", "layouts differ", "object leaf", "worker missing"])
def test_packed_infos_merge_like_dicts(case):
    """Workers send packed infos (numeric leaves stacked by dtype, the layout only when it changed); the parent's
    merge equals merging the workers' dicts, over two steps (the second with cached layouts), in every case:
    all workers with one layout (the fast path), layouts that differ, an object leaf (sent as a dict), and a
    worker that did not reply (its envs get zeros and False masks)."""
    from envs.infos import InfoPacker, merge_infos, merge_packed, record_layout

    crafterish = {"achievements": {"collect_wood": 1, "eat_cow": 0}, "inventory": {"health": 9}, "reward": 0.1,
                  "flags": np.array([1, 0], np.int8), 7: 3}  # keys may be any hashable, as in gymnasium
    if case == "layouts differ":
        env_infos = [crafterish, crafterish, crafterish, {"reward": 1.0, "episode": {"r": 2.5}}]
    elif case == "object leaf":
        env_infos = [crafterish, crafterish, {"late": "x", **crafterish}, crafterish]
    else:
        env_infos = [crafterish, {**crafterish, "reward": -1.0}, crafterish, {**crafterish, "flags": np.ones(2, np.int8)}]
    packers, layouts = [InfoPacker(), InfoPacker()], {}
    slices = {0: slice(0, 2), 1: slice(2, 4)}
    for step in range(2):
        parts = _worker_parts(env_infos, 2)
        replying = [0] if case == "worker missing" else [0, 1]
        want: dict = {}
        for w in replying:
            want = merge_infos(want, parts[w], slices[w], 4)
        messages = {w: packers[w].pack(parts[w]) for w in replying}
        if case == "object leaf":
            assert messages[1][0] == "dict"
        else:
            assert messages[0][0] == "packed" and (messages[0][1] is None) == (step == 1)  # layout sent once
        for w, msg in messages.items():
            record_layout(layouts, w, msg)
        got = merge_packed(messages, layouts, {w: slices[w] for w in replying}, 4)
        _assert_infos_equal(got, want)
        if case == "same layout":
            assert got["achievements"]["collect_wood"].dtype == np.int64 and got["flags"].shape == (4, 2)
            assert got["reward"].tolist() == [0.1, -1.0, 0.1, 0.1]


class LayoutEnv(gymnasium.Env):
    """Reset and step infos with different keys (so a worker's packed layout changes); reset raises while
    `fail_flag` exists, for envs with index >= 2 (the second worker)."""

    observation_space = Box(-1.0, 1.0, (1,), np.float64)
    action_space = Discrete(2)

    def __init__(self, index, fail_flag):
        self.index, self.fail_flag = index, fail_flag

    def reset(self, *, seed=None, options=None):
        if self.index >= 2 and os.path.exists(self.fail_flag):
            raise ValueError("boom: injected reset failure")
        return np.zeros(1), {"r": 0.5, "q": 1.5}

    def step(self, action):
        return np.ones(1), 0.0, False, False, {"t": 7.0, "u": 3.0}


def test_info_layouts_stay_in_step_after_a_failed_reset(tmp_path):
    """A reset() that raises (a worker failed it twice) after other workers replied with a new info layout: the
    parent has recorded their layouts anyway, so the next reset's infos are labelled right."""
    flag = tmp_path / "fail"
    venv = ResilientVectorEnv([partial(LayoutEnv, i, str(flag)) for i in range(4)], envs_per_worker=2)
    try:
        venv.reset(seed=0)
        venv.step(np.zeros(4, dtype=np.int64))
        flag.touch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(RuntimeError, match="failed reset twice"):
                venv.reset(seed=0)
        flag.unlink()
        with pytest.warns(RuntimeWarning, match="restarting it"):  # the worker that failed is gone
            _, infos = venv.reset(seed=0)
        assert set(infos) == {"r", "_r", "q", "_q"}
        np.testing.assert_array_equal(infos["r"], [0.5] * 4)
        np.testing.assert_array_equal(infos["q"], [1.5] * 4)
    finally:
        venv.close()


def test_a_reset_given_up_on_has_recorded_the_other_workers_layouts(tmp_path):
    """The crash-loop cap raises in the restart of a worker that failed reset: the workers that replied have sent
    their reset info layout once, and the parent has recorded it before the raise (it is not sent again)."""
    flag = tmp_path / "fail"
    venv = ResilientVectorEnv([partial(LayoutEnv, i, str(flag)) for i in range(4)], envs_per_worker=2,
                              max_restarts=0)
    try:
        venv.reset(seed=0)
        reset_layout = venv._layouts[0]
        venv.step(np.zeros(4, dtype=np.int64))
        assert venv._layouts[0] != reset_layout  # the step infos' keys
        flag.touch()
        with pytest.raises(RuntimeError, match="failed after 0 restarts"):
            venv.reset(seed=0)
        assert venv._layouts[0] == reset_layout
    finally:
        venv.close()


def test_a_restarted_env_plays_the_episodes_of_its_derived_seed():
    """After worker 1 fails, its env resets with seed SeedSequence([s + 1, restarts]) (s: reset's seed), then goes
    on with seed None like any env: the same observations as an env reset in-process with that seed, through its
    next autoresets (not the derived seed again, and not an unseeded env)."""
    import tempfile

    actions = np.random.default_rng(1).integers(0, 3, (40, 2))
    with tempfile.TemporaryDirectory() as tmp:
        fns = [CounterEnv, partial(CounterEnv, fail_at=6, fail_once=os.path.join(tmp, "failed"))]
        venv = ResilientVectorEnv(fns)
        try:
            venv.reset(seed=10)
            with pytest.warns(RuntimeWarning, match="boom"):
                for crash in range(10):  # env 1's 6th step (resets are no steps) raises
                    _, _, _, trunc, _ = venv.step(actions[crash])
                    if venv.restarts:
                        break
            assert trunc[1] and venv.restarts == 1
            ref, derived = CounterEnv(), int(np.random.SeedSequence([11, 1]).generate_state(1)[0])
            resets, done = 0, False
            for t in range(crash + 1, 40):
                obs, _, term, trunc, _ = venv.step(actions[t])
                if t == crash + 1:
                    want, _ = ref.reset(seed=derived)
                elif done:
                    want, _ = ref.reset()
                    resets += 1
                else:
                    want = ref.step(int(actions[t, 1]))[0]
                np.testing.assert_array_equal(obs[1], want, err_msg=f"step {t}")
                done = term[1] or trunc[1]
            assert resets >= 2 and venv.restarts == 1
        finally:
            venv.close()


def test_the_restart_cap_counts_the_restarts_of_the_last_window_steps():
    """An env failing at its first step fails at vector steps 1, 3, 5, ... (its fresh copy resets in between). With
    max_restarts=1, restart_window=2 holds the restarts of steps (t-2, t]: one each time, so it goes on; a window of
    3 holds two at step 3 and gives up."""
    venv = ResilientVectorEnv([partial(CounterEnv, fail_at=1)], max_restarts=1, restart_window=2)
    try:
        venv.reset(seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(10):
                venv.step(np.zeros(1, dtype=np.int64))
        assert venv.restarts == 5
    finally:
        venv.close()
    venv = ResilientVectorEnv([partial(CounterEnv, fail_at=1)], max_restarts=1, restart_window=3)
    try:
        venv.reset(seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            venv.step(np.zeros(1, dtype=np.int64))
            venv.step(np.zeros(1, dtype=np.int64))
            with pytest.raises(RuntimeError, match="1 restarts within 3 steps; giving up"):
                venv.step(np.zeros(1, dtype=np.int64))
    finally:
        venv.close()


class ClosingEnv(CounterEnv):
    """Writes `<folder>/<pid>-<n>` when closed (an env that flushes its logs on close)."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def close(self):
        with open(os.path.join(self.folder, f"{os.getpid()}-{len(os.listdir(self.folder))}"), "w"):
            pass


def test_close_lets_every_worker_close_its_envs(tmp_path):
    """close() asks the workers to close their envs (not just kills them after CLOSE_TIMEOUT): every env's close
    runs, in its worker, and quickly."""
    from envs.vector import CLOSE_TIMEOUT

    venv = ResilientVectorEnv([partial(ClosingEnv, str(tmp_path))] * 4, envs_per_worker=2)
    venv.reset(seed=0)
    pids = set(venv.worker_pids)
    for p in tmp_path.iterdir():  # the probe env the parent built and closed
        p.unlink()
    start = time.monotonic()
    venv.close()
    assert time.monotonic() - start < CLOSE_TIMEOUT
    closed = [int(p.name.split("-")[0]) for p in tmp_path.iterdir()]
    assert len(closed) == 4 and set(closed) == pids


def test_a_vector_env_has_a_finite_step_timeout_by_default():
    """Runs and collections pass no step_timeout: the default is what turns a hung env into a restart instead of a
    hung run."""
    venv = make_vector_env(CounterEnv, 1)
    try:
        assert 0 < venv.step_timeout < float("inf")
    finally:
        venv.close()


class _Clock:
    """A fake clock: `now` moves only when the test moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_vector_env_rate_counts_every_env_and_times_the_steps_only(monkeypatch):
    """measure_steps_per_second = steps x num_envs / the stepping time (reset and seeding excluded): 8 steps of 3
    envs, each step 0.5 s and the reset 100 s, is 24 / 4 = 6 env steps/s."""
    import types

    import envs.throughput as throughput
    from gymnasium.spaces import MultiDiscrete

    clock = _Clock()
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=clock, monotonic=clock))

    class FakeVenv:
        num_envs, action_space = 3, MultiDiscrete([3, 3, 3])

        def reset(self, seed=None):
            clock.now += 100.0

        def step(self, actions):
            clock.now += 0.5

    assert measure_steps_per_second(FakeVenv(), 8) == 6.0


def test_independent_rate_is_all_steps_over_first_start_to_last_finish(monkeypatch):
    """The no-IPC ceiling: processes x envs_per_process x steps / (last finish - first start), each process timing
    from the barrier they all pass. Process 0 runs 0 -> 2 s, process 1 1 -> 4 s: 2 x 2 x 10 steps / 4 s = 10."""
    import queue
    import types

    import envs.throughput as throughput

    spans, events = iter([0.0, 2.0, 1.0, 4.0]), []
    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(
        monotonic=lambda: events.append("clock") or next(spans), perf_counter=lambda: 0.0))

    class Ctx:  # runs each "process" in place, one after the other
        def Barrier(self, n):
            return types.SimpleNamespace(wait=lambda: events.append("barrier"))

        def Queue(self):
            return queue.Queue()

        def Process(self, target, args, daemon):
            seeds.append(args[3])
            return types.SimpleNamespace(start=lambda: target(*args), join=lambda timeout=None: None,
                                         is_alive=lambda: False, exitcode=0)

    monkeypatch.setattr(throughput, "mp", types.SimpleNamespace(get_context=lambda name: Ctx()))
    seeds = []
    rate = measure_independent_steps_per_second(CounterEnv, 2, 10, envs_per_process=2, context="fork")
    assert rate == 10.0 and seeds == [0, 2]  # envs 0, 1 and 2, 3: every env its own seed
    assert events == ["barrier", "clock", "clock"] * 2  # each process starts its clock after the barrier


def test_a_closed_vector_env_refuses_to_step_or_reset():
    """A step or reset after close would start the workers again, with no close left to end them: refused."""
    venv = ResilientVectorEnv([CounterEnv] * 2)
    venv.reset(seed=0)
    venv.close()
    for call in (lambda: venv.step(np.array([0, 1])), lambda: venv.reset(seed=0)):
        with pytest.raises(gymnasium.error.ClosedEnvironmentError, match="is closed: make a new one"):
            call()
    assert not mp.active_children() and venv._shm is None


def test_the_callers_mistakes_are_refused_not_taken_for_crashes():
    """Seeds and actions a worker would raise on (taken for a crash: a restart, the episodes truncated) are refused in
    the caller; numpy seeds and lists or tensors of actions are taken."""
    import torch

    venv = ResilientVectorEnv([CounterEnv] * 4, envs_per_worker=2)
    try:
        with pytest.raises(gymnasium.error.ResetNeeded, match=r"call reset\(\) before step\(\)"):
            venv.step(np.zeros(4, int))
        for seed, message in ((-1, "non-negative integers, got -1"), ([1.5] * 4, "got 1.5"),
                              ([True, 1, 2, 3], "got True"), (1.5, "one seed per env"), ([0, 1], "one seed per env")):
            with pytest.raises(ValueError, match=message):
                venv.reset(seed=seed)
        first = venv.reset(seed=np.arange(4))[0]
        assert np.array_equal(first, venv.reset(seed=[0, 1, 2, 3])[0]) and np.array_equal(first, venv.reset(
            seed=range(4))[0])
        for actions in ([1, 1], [1, 1, 1, 1, 1], [[1, 1]] * 4):
            with pytest.raises(ValueError, match="are not one per env"):
                venv.step(actions)
        venv.step([1, 2, 0, 1])
        venv.step(torch.tensor([1, 2, 0, 1]))
        assert venv.restarts == 0
    finally:
        venv.close()


class SlowStartEnv(CounterEnv):
    """Takes a while to build, as a game does on a crowded machine."""

    def __init__(self, **kwargs):
        time.sleep(1.5)
        super().__init__(**kwargs)


def test_a_fresh_worker_has_the_start_timeout_to_build_its_envs():
    """Many workers starting on few cores take far longer than a step: a fresh worker's first reply may take
    start_timeout, later ones step_timeout."""
    venv = ResilientVectorEnv([SlowStartEnv] * 2, step_timeout=0.5, start_timeout=30)
    try:
        venv.reset(seed=0)
        venv.step(np.array([0, 1]))
        assert venv.restarts == 0
    finally:
        venv.close()
    venv = ResilientVectorEnv([SlowStartEnv] * 2, step_timeout=0.5, start_timeout=0.5)
    try:
        with pytest.raises(RuntimeError, match=r"no reply within start_timeout=0.5s$"):  # no script hint: it hung
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                venv.reset(seed=0)
    finally:
        venv.close()


def test_a_hung_worker_beside_a_fresh_one_gets_the_step_timeout(tmp_path):
    """The step after a restart: the fresh worker may take start_timeout, but a hung old one is given up on after
    step_timeout, not after the fresh one's limit."""
    fns = [partial(CounterEnv, fail_at=1, fail_once=str(tmp_path / "once")), partial(CounterEnv, fail_at=2,
                                                                                      fail_mode="hang")]
    venv = ResilientVectorEnv(fns, step_timeout=0.5, start_timeout=60)
    try:
        venv.reset(seed=0)
        with pytest.warns(RuntimeWarning, match="boom"):
            venv.step(np.array([0, 0]))  # worker 0 raises and is restarted
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match=r"worker 1 .*no reply within step_timeout=0.5s"):
            venv.step(np.array([0, 0]))  # worker 0 is fresh; worker 1 hangs
        assert time.monotonic() - start < 10 and venv.restarts == 2
    finally:
        venv.close()


def test_a_pid_another_process_took_is_not_the_run():
    """The worker's watchdog knows its run by pid and start time: a process that later took the pid is not it."""
    from envs.vector import _proc_stat

    fields = _proc_stat(os.getpid())
    if fields is None:
        pytest.skip("no /proc")
    assert _alive(os.getpid(), fields[19]) and _alive(os.getpid())
    assert not _alive(os.getpid(), str(int(fields[19]) + 1))
    child = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    assert not _alive(child.pid)


ORPHAN = """
import sys
import time

import gymnasium
import numpy as np

from envs.vector import ResilientVectorEnv


class HangingEnv(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(0, 1, (1,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        time.sleep(600)


if __name__ == "__main__":
    venv = ResilientVectorEnv([HangingEnv], step_timeout=None)
    venv.reset(seed=0)
    print(venv.worker_pids[0], flush=True)
    venv.step(np.array([0]))
"""


@pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(), reason="the workers' parent is the run")
def test_a_worker_ends_when_its_run_is_killed_outright(tmp_path):
    """SIGKILL (the OOM killer, say) of a run whose worker hangs in an env step: the worker notices its run is gone
    and exits, where it used to wait on its step for ever."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "orphan.py").write_text(ORPHAN)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, str(tmp_path / "orphan.py")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)}, cwd=tmp_path)
    try:
        worker = int(proc.stdout.readline())
        time.sleep(0.5)  # into the hung step
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _alive(worker):  # gone, or a zombie no one has reaped yet
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its run")
    finally:
        proc.kill()
