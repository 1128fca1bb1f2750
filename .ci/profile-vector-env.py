"""The parent process's share of vectorized env stepping: cProfile around random-action vector steps.

Past a few workers the parent (sending actions, gathering replies, merging infos) bounds a vector env's rate, so
its own time per step is the figure to lower (issue 6). From the project root:
    python .ci/profile-vector-env.py [GAME] [WORKERS] [ENVS_PER_WORKER] [VECTOR_STEPS]   # nethack 2 16 60
"""
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs.collect import env_fn  # noqa: E402
from envs.vector import make_vector_env, measure_steps_per_second  # noqa: E402

if __name__ == "__main__":
    game, workers, per_worker, steps = (sys.argv[1:] + ["nethack", "2", "16", "60"][len(sys.argv) - 1:])[:4]
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
