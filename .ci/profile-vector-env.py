"""The parent process's share of vectorized env stepping: cProfile around random-action vector steps, after the
cost of one worker reply's infos as a nested dict of arrays and packed (envs/infos.py), and of gathering the
replies of WORKERS and of 16 workers (envs.vector._Readiness against multiprocessing's wait).

Past a few workers the parent (sending actions, gathering replies, merging infos) bounds a vector env's rate, so
its own time per step is the figure to lower (issue 6). From the project root:
    python .ci/profile-vector-env.py [GAME] [WORKERS] [ENVS_PER_WORKER] [VECTOR_STEPS]   # nethack 2 16 60
"""
import cProfile
import multiprocessing as mp
import pickle
import pstats
import sys
import timeit
from multiprocessing.connection import wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs.collect import env_fn  # noqa: E402
from envs.infos import InfoBatcher, InfoPacker  # noqa: E402
from envs.throughput import measure_steps_per_second  # noqa: E402
from envs.vector import _Readiness, make_vector_env  # noqa: E402


def reply_costs(game: str, per_worker: int) -> None:
    """Bytes and pickle/unpickle µs of one worker's batched infos after a step of its envs, as a dict and packed."""
    envs = [env_fn(game, stats_path=None)() for _ in range(per_worker)]
    infos, batcher = {}, InfoBatcher(per_worker)
    for j, env in enumerate(envs):
        env.reset(seed=j)
        infos = batcher._add_info(infos, env.step(env.action_space.sample())[4], j)
        env.close()
    for name, msg in (("dict", ("dict", infos)), ("packed", InfoPacker().pack(infos))):
        blob = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        dumps = timeit.timeit(lambda: pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), number=2000) / 2000
        loads = timeit.timeit(lambda: pickle.loads(blob), number=2000) / 2000
        print(f"# one reply's infos, {per_worker} {game} envs, {name}: {len(blob)} bytes, pickle {1e6 * dumps:.0f} µs, "
              f"unpickle {1e6 * loads:.0f} µs")


def gather_costs(workers: int, repeats: int = 200) -> None:
    """µs per vector step of gathering one reply from each of `workers` pipes when the replies arrive one by one
    (each wake-up finds one): multiprocessing's wait over the pending set, as the vector env did, against the env's
    `_Readiness` (select.poll, each pipe registered once per exchange). Both include the same pipe writes and reads."""
    pairs = [mp.Pipe() for _ in range(workers)]

    def with_wait():
        pending = [parent for parent, _ in pairs]
        for _, child in pairs:
            child.send_bytes(b"x")
            ready = wait(pending, 10.0)[0]
            ready.recv_bytes()
            pending.remove(ready)

    def with_readiness():
        ready = _Readiness([parent for parent, _ in pairs])
        for _, child in pairs:
            child.send_bytes(b"x")
            ready.wait(10.0)[0].recv_bytes()

    for name, fn in (("multiprocessing wait", with_wait), ("_Readiness", with_readiness)):
        print(f"# gathering {workers} replies arriving one by one, {name}: "
              f"{1e6 * timeit.timeit(fn, number=repeats) / repeats:.0f} µs per step")


if __name__ == "__main__":
    game, workers, per_worker, steps = (sys.argv[1:] + ["nethack", "2", "16", "60"][len(sys.argv) - 1:])[:4]
    reply_costs(game, int(per_worker))
    gather_costs(int(workers))
    gather_costs(16)
    venv = make_vector_env(env_fn(game, stats_path=None), int(workers) * int(per_worker),
                           envs_per_worker=int(per_worker))
    measure_steps_per_second(venv, 5)  # workers started, envs warm
    profiler = cProfile.Profile()
    profiler.enable()
    rate = measure_steps_per_second(venv, int(steps))
    profiler.disable()
    venv.close()
    stats = pstats.Stats(profiler)
    waiting = sum(t for (file, _, name), (_, _, t, _, _) in stats.stats.items() if name in ("<method 'poll' of "
                  "'select.poll' objects>", "<method 'select' of 'select.epoll' objects>"))
    print(f"# {game}, {workers} workers x {per_worker} envs, {steps} vector steps: {rate:.0f} env steps/s; "
          f"parent: {stats.total_calls} calls, {stats.total_tt:.3f} s, of which {waiting:.3f} s waiting for workers, "
          f"{stats.total_tt - waiting:.3f} s its own work")
    stats.sort_stats("tottime").print_stats(12)
