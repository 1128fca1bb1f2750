"""What a checkpoint's replay write costs: a self-contained save of a 150k-step ring of 64x64 frames against a
chunked save (`ReplayBuffer.save(..., chunks=)`) after 10k new steps, and loading from the chunks.
`python .ci/replay-save.py` (writes ~2 GiB under a temporary folder, then deletes it)."""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.replay import ReplayBuffer  # noqa: E402

N, STORED, NEW = 16, 150_000, 10_000
buf = ReplayBuffer(200_000, {"image": ((64, 64, 3), np.uint8)})
rng = np.random.default_rng(0)


def add(steps: int) -> None:
    flags = np.zeros(N, bool)
    for _ in range(steps // N):
        buf.add_steps({"image": rng.integers(0, 255, (N, 64, 64, 3), dtype=np.uint8), "action": np.zeros(N, np.int64),
                       "reward": np.zeros(N, np.float32), "is_first": flags, "is_last": flags, "is_terminal": flags},
                      range(N))


add(STORED)
with tempfile.TemporaryDirectory() as tmp:
    d = Path(tmp)
    t = time.perf_counter()
    buf.save(d / "whole.npz")
    whole = time.perf_counter() - t
    buf.save(d / "state0.npz", chunks="rank0")
    add(NEW)
    before = {p.name for p in d.iterdir()}
    t = time.perf_counter()
    needed = buf.save(d / "state1.npz", chunks="rank0")
    chunked = time.perf_counter() - t
    new = sum((d / n).stat().st_size for n in needed if n not in before)
    t = time.perf_counter()
    ReplayBuffer.load(d / "state1.npz")
    print(f"self-contained save of {STORED} steps: {(d / 'whole.npz').stat().st_size / 2**30:.2f} GiB in {whole:.1f} s; "
          f"chunked save after {NEW} new steps: {new / 2**20:.0f} MiB in {chunked:.2f} s; "
          f"load from {len(needed) - 1} chunks: {time.perf_counter() - t:.1f} s")
