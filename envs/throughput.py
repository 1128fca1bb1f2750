"""How fast envs step: a vector env's rate, and the rate of independent processes stepping their own envs with no IPC
(the ceiling a vector env's efficiency is measured against). `run.py bench envs` prints both."""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable

import gymnasium
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from .vector import CLOSE_TIMEOUT, default_context


def measure_steps_per_second(venv: gymnasium.vector.VectorEnv, steps: int) -> float:
    """Env steps per second (``steps`` vector steps x num_envs) with random actions, after a reset."""
    venv.reset(seed=0)
    venv.action_space.seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        venv.step(venv.action_space.sample())
    return steps * venv.num_envs / (time.perf_counter() - start)


def _step_alone(env_fn, num_envs: int, steps: int, seed: int, barrier, results) -> None:
    """One process of measure_independent_steps_per_second: its own envs, no IPC until the end."""
    venv = SyncVectorEnv([env_fn] * num_envs, autoreset_mode=AutoresetMode.NEXT_STEP)
    venv.reset(seed=seed)
    venv.action_space.seed(seed)
    barrier.wait()
    start = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
    for _ in range(steps):
        venv.step(venv.action_space.sample())
    results.put((start, time.monotonic()))
    venv.close()


def measure_independent_steps_per_second(env_fn: Callable[[], gymnasium.Env], processes: int, steps: int,
                                         envs_per_process: int = 1, context: str | None = None) -> float:
    """Env steps/s of ``processes`` processes stepping their own envs side by side with no IPC per step (started
    together; rate = all steps / (last finish - first start)): what the machine's cores give without any vector-env
    overhead, the ceiling a vector env's efficiency is measured against."""
    ctx = mp.get_context(context or default_context())
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_step_alone, args=(env_fn, envs_per_process, steps, i * envs_per_process, barrier,
                                                   results), daemon=True)  # env seeds 0, 1, ...: each env its own
             for i in range(processes)]
    for proc in procs:
        proc.start()
    times = []
    try:
        while len(times) < processes:
            try:
                times.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a measuring process failed (exit code {dead[0]}); its traceback is above")
    finally:
        for proc in procs:
            proc.join(CLOSE_TIMEOUT)
            if proc.is_alive():
                proc.kill()
    wall = max(end for _, end in times) - min(start for start, _ in times)
    return processes * envs_per_process * steps / wall

