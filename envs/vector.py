"""Vectorized environments whose worker processes may crash without ending data collection.

``ResilientVectorEnv`` runs ``envs_per_worker`` env copies per process (one IPC round-trip per
worker per step) and follows gymnasium 1.x ``VectorEnv`` conventions with NEXT_STEP autoreset.
When a worker dies, hangs past ``step_timeout`` or an env raises, the worker is replaced by a
fresh one and its envs' episodes end as truncated (see ``ResilientVectorEnv.step``). A fresh
worker has ``start_timeout`` to build its envs and answer: many workers starting on few cores
take far longer than a step.

Start method: forkserver by default (spawn where unavailable).  Workers then start from a clean
server process, never forking a parent that holds torch/OpenMP threads or CUDA state (fork can
deadlock there), and the server preloads this module and the env's so a (re)start costs
milliseconds, not a fresh interpreter and the game's imports.  Env functions are therefore
pickled: use module-level callables or ``functools.partial`` of them, not lambdas or closures,
and guard the main script with ``if __name__ == "__main__":``.  ``context="fork"`` accepts
closures at fork's risks.
"""
from __future__ import annotations

import multiprocessing as mp
import numbers
import os
import select
import signal
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from multiprocessing.connection import wait
from typing import Any, Optional

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import (
    batch_space,
    concatenate,
    create_empty_array,
    create_shared_memory,
    iterate,
    read_from_shared_memory,
    write_to_shared_memory,
)

from .infos import InfoBatcher, InfoPacker, merge_packed, record_layout

CLOSE_TIMEOUT = 2.0  # seconds a worker gets to close its envs before it is killed
PARENT_CHECK = 1.0  # seconds between a worker's checks that the process that started it is still there


def _proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/<pid>/stat from the state on (the state first, the start time at 19), or None (no such
    file: gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int, started: Optional[str] = None) -> bool:
    """Whether process `pid` runs: not gone, not a zombie waiting to be reaped, and, given its start time `started`
    (`_proc_stat`), not another process that took its pid since."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds the pid: its start time tells whether it is ours
        pass
    fields = _proc_stat(pid)
    if fields is None:  # no /proc: os.kill's answer
        return True
    return fields[0] != "Z" and (started is None or fields[19] == started)


def _exit_with(parent: int) -> None:
    """End this worker once `parent` is gone: a parent killed outright (SIGKILL, the OOM killer) leaves its pipes'
    EOF to a worker that reads them, and a worker inside a hung env step never reads again."""
    fields = _proc_stat(parent)
    started = fields[19] if fields else None
    while _alive(parent, started):
        time.sleep(PARENT_CHECK)
    os._exit(1)


def _worker(env_fns, offset, conn, obs_space, shm, parent):
    """Worker loop: build envs, then run one message per vector step until None arrives.

    A message is (actions, resets): env j resets with ``resets[j] = (seed, options)`` when j is in ``resets``, else
    steps with ``actions[j]``. The reply is ("ok", (obs, rewards, terminations, truncations, infos)) with obs None
    when written to shared memory at ``offset + j`` and infos already in the vector layout over this worker's envs,
    packed (``envs.infos``), or ("error", traceback text) after which the worker exits.
    """
    # Ctrl-C and SIGTERM are the parent's to handle: a terminal, a scheduler or torchrun sends them to the whole process
    # group, and the parent finishes its step (which steps these envs) before it stops; it closes or kills the worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    envs = []
    try:
        envs = [fn() for fn in env_fns]
        batcher, packer = InfoBatcher(len(envs)), InfoPacker()
        while (msg := conn.recv()) is not None:
            actions, resets = msg
            obs, rewards, terms, truncs, infos = [], [], [], [], {}
            for j, env in enumerate(envs):
                if j in resets:
                    seed, options = resets[j]
                    o, info = env.reset(seed=seed, options=options)
                    r, te, tr = 0.0, False, False
                else:
                    o, r, te, tr, info = env.step(actions[j])
                obs.append(o)
                rewards.append(float(r))
                terms.append(bool(te))
                truncs.append(bool(tr))
                infos = batcher._add_info(infos, info, j)
            if shm is None:
                batch = concatenate(obs_space, obs, create_empty_array(obs_space, len(obs)))
            else:
                for j, o in enumerate(obs):
                    write_to_shared_memory(obs_space, offset + j, o, shm)
                batch = None
            conn.send(("ok", (batch, rewards, terms, truncs, packer.pack(infos))))
    except EOFError:  # parent went away
        pass
    except Exception:
        with suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        for env in envs:
            with suppress(Exception):
                env.close()
        conn.close()


def _copy_into(dst, dst_idx, src, src_idx):
    """``dst[dst_idx] = src[src_idx]`` on every array of a (nested dict/tuple) batched observation."""
    if isinstance(dst, dict):
        for key in dst:
            _copy_into(dst[key], dst_idx, src[key], src_idx)
    elif isinstance(dst, tuple):
        for d, s in zip(dst, src):
            _copy_into(d, dst_idx, s, src_idx)
    else:
        dst[dst_idx] = src[src_idx]


class _Readiness:
    """The connections of one exchange, each polled until it has a reply (or its worker hung up).

    ``multiprocessing.connection.wait`` builds a selector over every connection it is given at each call: with the
    replies of W workers arriving one by one, O(W²) registrations per vector step. ``select.poll`` registers each
    connection once per exchange and forgets it once returned (at 16 workers, 289 µs per step instead of 837 on the
    2-core machine, pipe reads and writes included: ``.ci/profile-vector-env.py``). Where poll is missing
    (Windows), ``wait`` on the connections not yet returned."""

    def __init__(self, conns):
        self._left = {conn.fileno(): conn for conn in conns}
        self._poll = select.poll() if hasattr(select, "poll") else None
        for fd in self._left if self._poll is not None else ():
            self._poll.register(fd, select.POLLIN)

    def wait(self, timeout: float | None) -> list:
        """The connections readable within `timeout` seconds (None: no limit), each returned once; [] on timeout."""
        if self._poll is None:
            ready = wait(list(self._left.values()), timeout)
            for conn in ready:
                del self._left[conn.fileno()]
            return ready
        events = self._poll.poll(None if timeout is None else 1000 * timeout)
        for fd, _ in events:  # readable, or hung up / in error: recv then raises, as after wait
            self._poll.unregister(fd)
        return [self._left.pop(fd) for fd, _ in events]

    def drop(self, conn) -> None:
        """Stop waiting on `conn` (its worker is given up on)."""
        del self._left[conn.fileno()]
        if self._poll is not None:
            self._poll.unregister(conn.fileno())


def start_forkserver_ignoring_ctrl_c() -> None:
    """Start multiprocessing's fork server (and the resource tracker it starts first) with Ctrl-C ignored, a
    disposition their exec keeps: a terminal's Ctrl-C reaches every process of the run, and one in the first second,
    while the server still imports its preload modules, killed it with a traceback over the run's own message. Only
    the spawn is shielded (milliseconds), not the imports, so the run's own Ctrl-C is not lost."""
    import multiprocessing.forkserver
    import threading

    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        multiprocessing.forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def crowding_note(workers: int, setting: str) -> Optional[str]:
    """A note when `workers` env processes (from `setting`, the options or keys that make them) would crowd the
    cores, more than two to a core: each steps slowly, and they all start at once."""
    cores = usable_cores()
    if workers <= 2 * cores:
        return None
    return (f"note: {setting} starts {workers} env worker processes on {cores} CPU cores; fewer processes running "
            "more envs each step as fast with less overhead")


def default_context() -> str:
    """forkserver where available (workers never inherit torch threads or CUDA state), else spawn."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class ResilientVectorEnv(gymnasium.vector.VectorEnv):
    """Env copies in worker processes; a crashed, hung or raising worker is restarted, not fatal.

    One env is built in the parent to read the spaces and metadata, then closed.  Observations go
    through shared memory when ``shared_memory`` is true (Box/Discrete/Multi*/Dict/Tuple spaces),
    else they are pickled through the pipes.  It gives up (RuntimeError) when more than ``max_restarts``
    restarts fall within ``restart_window`` vector steps: a crash loop, not the rare crash of a long run.
    A worker answers a step within ``step_timeout`` seconds, and its first message (after building its envs) within
    ``start_timeout``; None: no limit.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gymnasium.Env]],
        envs_per_worker: int = 1,
        context: str | None = None,
        step_timeout: float | None = 60.0,
        start_timeout: float | None = 300.0,
        max_restarts: int = 100,
        shared_memory: bool = True,
        restart_window: int = 1000,
    ):
        self._procs: list = []  # set first so close() works on a half-built instance
        self._conns: list = []
        env_fns = list(env_fns)
        if not env_fns or envs_per_worker < 1 or len(env_fns) % envs_per_worker:
            raise ValueError(
                f"num_envs={len(env_fns)} must be a positive multiple of envs_per_worker={envs_per_worker}"
            )
        self.env_fns = env_fns
        self.num_envs = len(env_fns)
        self.envs_per_worker = envs_per_worker
        self.num_workers = self.num_envs // envs_per_worker
        self.step_timeout, self.start_timeout = step_timeout, start_timeout
        self._fresh: set[int] = set()  # workers yet to answer their first message
        self._reset_needed = True  # until the first reset()
        self.max_restarts, self.restart_window = max_restarts, restart_window
        self.restarts = 0  # over the env's life (logged); the cap counts those of the last restart_window steps
        self._steps, self._recent = 0, deque()  # vector steps so far; the step of each recent restart

        probe = env_fns[0]()
        self.single_observation_space = probe.observation_space
        self.single_action_space = probe.action_space
        self.metadata = dict(probe.metadata, autoreset_mode=AutoresetMode.NEXT_STEP)
        self.render_mode = probe.render_mode
        env_module = type(probe.unwrapped).__module__
        probe.close()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        context = context or default_context()
        self._ctx = mp.get_context(context)
        if context == "forkserver":  # the server imports these once, so each worker starts in ms
            self._ctx.set_forkserver_preload(["__main__", __name__, env_module])
            start_forkserver_ignoring_ctrl_c()
        self._shm = (
            create_shared_memory(self.single_observation_space, self.num_envs, ctx=self._ctx)
            if shared_memory
            else None
        )
        self._shm_view = (
            read_from_shared_memory(self.single_observation_space, self._shm, self.num_envs)
            if shared_memory
            else None
        )
        self._obs = create_empty_array(self.single_observation_space, self.num_envs)  # last obs per env
        self._autoreset = np.zeros(self.num_envs, dtype=np.bool_)  # (num_envs,) reset on next step
        self._seeds: list[int | None] = [None] * self.num_envs  # seeds of the last reset()
        self._next_reset_seed: list[int | None] = [None] * self.num_envs  # for the next autoreset
        self._layouts: dict = {}  # worker -> the info layout it last sent (envs.infos)
        self._procs = [None] * self.num_workers
        self._conns = [None] * self.num_workers
        for w in range(self.num_workers):
            self._start(w)

    @property
    def worker_pids(self) -> list[int]:
        """Process id of each worker, in worker order (worker w holds envs w*k .. w*k+k-1)."""
        return [p.pid for p in self._procs]

    def _slice(self, w: int) -> slice:
        return slice(w * self.envs_per_worker, (w + 1) * self.envs_per_worker)

    def _start(self, w: int):
        sl = self._slice(w)
        parent_conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker,
            args=(self.env_fns[sl], sl.start, child_conn, self.single_observation_space, self._shm, os.getpid()),
            name=f"ResilientVectorEnv-worker-{w}",
            daemon=True,
        )
        proc.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        self._procs[w], self._conns[w] = proc, parent_conn
        self._fresh.add(w)

    def _stop(self, w: int):
        """Kill worker w unless it already exited, and close its pipe."""
        proc = self._procs[w]
        if proc.is_alive():
            proc.kill()
        proc.join()
        self._conns[w].close()

    def _restart(self, w: int, reason: str):
        """Replace worker w by a fresh one; raise once more than max_restarts fall within restart_window steps."""
        self._stop(w)
        self.restarts += 1
        self._recent.append(self._steps)
        while self._recent[0] <= self._steps - self.restart_window:
            self._recent.popleft()
        sl = self._slice(w)
        if len(self._recent) > self.max_restarts:
            raise RuntimeError(
                f"ResilientVectorEnv: worker {w} (envs {sl.start}..{sl.stop - 1}) failed after "
                f"{self.max_restarts} restarts within {self.restart_window} steps; giving up. Last failure: {reason}"
            )
        warnings.warn(
            f"ResilientVectorEnv: worker {w} (envs {sl.start}..{sl.stop - 1}) failed, restarting it "
            f"(restart {self.restarts}; {len(self._recent)} of {self.max_restarts} allowed within "
            f"{self.restart_window} steps): {reason}",
            RuntimeWarning,
            stacklevel=3,
        )
        self._layouts.pop(w, None)  # the fresh worker sends its info layout with its first reply
        self._start(w)

    def _exchange(self, messages: dict[int, tuple], workers: Sequence[int]) -> dict[int, tuple[bool, Any]]:
        """Send each worker its (actions, resets) message and gather replies: {w: (True, data) or (False, reason)}."""
        results: dict[int, tuple[bool, Any]] = {}
        pending = {}
        for w in workers:
            try:
                self._conns[w].send(messages[w])
                pending[self._conns[w]] = w
            except OSError as e:  # BrokenPipeError, ConnectionResetError
                results[w] = (False, f"worker process died (send failed: {e!r})")
        # each worker's own limit: a fresh one builds its envs first
        limits = {w: ("start_timeout", self.start_timeout) if w in self._fresh else ("step_timeout", self.step_timeout)
                  for w in pending.values()}
        start = time.monotonic()
        deadlines = {w: start + limit for w, (_, limit) in limits.items() if limit is not None}
        ready_conns = _Readiness(pending)
        while pending:
            waiting = [deadlines[w] for w in pending.values() if w in deadlines]
            ready = ready_conns.wait(max(0.0, min(waiting) - time.monotonic()) if waiting else None)
            if not ready:
                now = time.monotonic()
                for conn, w in [(c, w) for c, w in pending.items() if w in deadlines and deadlines[w] <= now]:
                    del pending[conn]
                    ready_conns.drop(conn)
                    results[w] = (False, "no reply within {}={}s".format(*limits[w]))
                continue
            for conn in ready:
                w = pending.pop(conn)
                try:
                    status, data = conn.recv()
                except (EOFError, OSError) as e:
                    self._procs[w].join(0.1)
                    results[w] = (False, f"worker process died (exit code {self._procs[w].exitcode}, {e!r})")
                    continue
                if status == "ok":
                    results[w] = (True, data)
                    self._fresh.discard(w)
                else:
                    results[w] = (False, f"env raised an exception:\n{data}")
        return results

    def _store(self, w: int, data, obs, rewards, terms, truncs, parts: dict) -> None:
        """Copy one worker's reply into the batch buffers; its packed infos go to `parts` (worker -> message)."""
        sl = self._slice(w)
        batch, r, te, tr, parts[w] = data
        record_layout(self._layouts, w, parts[w])  # now: the worker counts it as sent
        if batch is None:
            _copy_into(obs, sl, self._shm_view, sl)
        else:
            _copy_into(obs, sl, batch, slice(None))
        rewards[sl], terms[sl], truncs[sl] = r, te, tr

    def _merge(self, parts: dict) -> dict:
        """The vector infos from the replying workers' packed infos."""
        return merge_packed(parts, self._layouts, {w: self._slice(w) for w in parts}, self.num_envs)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        """Reset every env: seed int s gives env i seed s + i; a failed worker is restarted and retried once."""
        self._check_open()
        if seed is None:
            seed = [None] * self.num_envs
        elif isinstance(seed, numbers.Integral):  # np.int64 too
            seed = [int(seed) + i for i in range(self.num_envs)]
        if not isinstance(seed, (list, tuple, range, np.ndarray)) or len(seed) != self.num_envs:
            raise ValueError(f"seed is an int or one seed per env (num_envs={self.num_envs}), got {seed!r}")
        bad = [s for s in seed if s is not None and (not isinstance(s, numbers.Integral) or isinstance(s, bool)
                                                     or s < 0)]
        if bad:  # a worker would raise on it, which reads as a crash
            raise ValueError(f"seeds are None or non-negative integers, got {bad[0]!r}")
        seed = [None if s is None else int(s) for s in seed]
        self._seeds = list(seed)
        self._next_reset_seed = [None] * self.num_envs
        self._autoreset[:] = False
        messages = {w: (None, {j: (seed[i], options) for j, i in enumerate(range(sl.start, sl.stop))})
                    for w, sl in ((w, self._slice(w)) for w in range(self.num_workers))}
        obs = create_empty_array(self.single_observation_space, self.num_envs, fn=np.empty)
        rewards, terms, truncs = np.zeros(self.num_envs), np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        parts: dict = {}
        results = self._exchange(messages, range(self.num_workers))
        failed = [w for w, (ok, _) in results.items() if not ok]
        for w in range(self.num_workers):  # every reply before any restart, which may raise (max_restarts)
            if results[w][0]:
                self._store(w, results[w][1], obs, rewards, terms, truncs, parts)
        for w in failed:
            self._restart(w, results[w][1])
        retried = self._exchange(messages, failed)
        for w in failed:  # every retry's reply before the raise: each worker's info layout is recorded
            if retried[w][0]:
                self._store(w, retried[w][1], obs, rewards, terms, truncs, parts)
        for w in failed:
            ok, data = retried[w]
            if not ok:
                hint = (" (from a script: guard its top level with `if __name__ == '__main__':`, since the workers' "
                        "process server runs the script again, or use asynchronous=False)"
                        if data.startswith("worker process died") else "")
                raise RuntimeError(f"ResilientVectorEnv: worker {w} failed reset twice: {data}{hint}")
        self._reset_needed = False
        self._obs = obs  # a fresh array, as step's
        return obs, self._merge(parts)

    def step(self, actions):
        """Step every env (NEXT_STEP autoreset); a failed worker's envs return this step truncated.

        For each env of a worker that died, hung or raised: its last observation, reward 0,
        terminated False, truncated True, info "worker_restarted" True.  The fresh worker's envs are
        reset on the next step (reward 0, no done flags) with seed None, or, if the last reset()
        gave the env seed s, a seed derived from (s, restart count), so seeded runs stay reproducible.
        """
        self._check_open()
        if self._reset_needed:
            raise gymnasium.error.ResetNeeded("call reset() before step()")
        if isinstance(self.single_action_space, gymnasium.spaces.Box):  # a list of floats: the space's dtype
            actions = np.asarray(actions, dtype=self.single_action_space.dtype)
        elif not isinstance(self.single_action_space, (gymnasium.spaces.Dict, gymnasium.spaces.Tuple)):
            actions = np.asarray(actions)  # a list or a torch tensor: checked below, and pickled as numpy
        discrete = isinstance(self.action_space, gymnasium.spaces.MultiDiscrete)  # whose `contains` takes 1.5
        if isinstance(actions, np.ndarray) and not ((actions.dtype.kind in "iu" or not discrete)
                                                    and self.action_space.contains(actions)):  # the caller's bug
            raise ValueError(f"actions {actions} are not one per env of {self.single_action_space} (the batch space "
                             f"is {self.action_space})")
        if not isinstance(actions, np.ndarray):  # nested action spaces: one entry per env
            actions = list(iterate(self.action_space, actions))
        self._steps += 1
        resets: dict = {w: {} for w in range(self.num_workers)}
        for i in np.flatnonzero(self._autoreset).tolist():
            w, j = divmod(i, self.envs_per_worker)
            resets[w][j] = (self._next_reset_seed[i], None)
            self._next_reset_seed[i] = None
        messages = {w: (actions[self._slice(w)], resets[w]) for w in range(self.num_workers)}
        # A fresh array per step, written once from shared memory, returned as is and kept as the last observation
        # (a restarted worker's envs report theirs).
        obs = create_empty_array(self.single_observation_space, self.num_envs, fn=np.empty)
        rewards = np.zeros(self.num_envs)  # (num_envs,) float64
        terms = np.zeros(self.num_envs, dtype=np.bool_)  # (num_envs,)
        truncs = np.zeros(self.num_envs, dtype=np.bool_)  # (num_envs,)
        parts: dict = {}
        results = self._exchange(messages, range(self.num_workers))
        failed = [w for w in range(self.num_workers) if not results[w][0]]
        for w in range(self.num_workers):  # every reply before any restart, which may raise (max_restarts)
            if results[w][0]:
                self._store(w, results[w][1], obs, rewards, terms, truncs, parts)
        for w in failed:
            self._restart(w, results[w][1])
        infos = self._merge(parts)
        for w in failed:
            sl = self._slice(w)
            _copy_into(obs, sl, self._obs, sl)
            truncs[sl] = True
            for i in range(sl.start, sl.stop):
                if self._seeds[i] is not None:
                    entropy = [self._seeds[i], self.restarts]
                    self._next_reset_seed[i] = int(np.random.SeedSequence(entropy).generate_state(1)[0])
                infos = self._add_info(infos, {"worker_restarted": True}, i)
        self._obs = obs
        self._autoreset = terms | truncs
        return obs, rewards, terms, truncs, infos

    def _check_open(self) -> None:
        """Refuse a closed env's step or reset, which would start its workers again, with no close left to end them."""
        if self.closed:
            raise gymnasium.error.ClosedEnvironmentError("this ResilientVectorEnv is closed: make a new one")

    def close_extras(self, **kwargs):
        """Ask every worker to close its envs, then kill those that have not exited in time; release the shared
        observation memory."""
        started = [w for w, proc in enumerate(self._procs) if proc is not None]
        for w in started:
            with suppress(OSError):
                self._conns[w].send(None)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for w in started:
            self._procs[w].join(max(0.0, deadline - time.monotonic()))
            self._stop(w)
        self._shm = self._shm_view = None


def make_vector_env(
    env_fn: Callable[[], gymnasium.Env],
    num_envs: int,
    envs_per_worker: int = 1,
    asynchronous: bool = True,
    **kw,
) -> gymnasium.vector.VectorEnv:
    """``num_envs`` copies of ``env_fn``: a ResilientVectorEnv (``kw`` passed on), or, for
    ``asynchronous=False``, an in-process SyncVectorEnv with the same autoreset mode (``envs_per_worker``
    and ``kw`` unused). Worker processes start from a forkserver that imports the calling script again: a script
    needs ``if __name__ == "__main__":`` around its top level. ``env_fn`` must pickle (``envs.collect.env_fn``)."""
    if not asynchronous:
        return SyncVectorEnv([env_fn] * num_envs, autoreset_mode=AutoresetMode.NEXT_STEP)
    return ResilientVectorEnv([env_fn] * num_envs, envs_per_worker=envs_per_worker, **kw)
