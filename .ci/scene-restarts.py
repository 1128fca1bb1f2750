"""How often the CLEVR-like generator restarts a whole scene (an object stayed hidden or found no place), the object
counts it gives, and how many scenes end with fewer objects than drawn for them: CLEVR restarts such a scene with its
count, so the counts stay uniform. From the project root:
    python .ci/scene-restarts.py full|crop MIN MAX   # 1280 scenes at 64x64 (10 batches of 128, seeds 0-9)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs.clevr import SceneGenerator  # noqa: E402


def main(view: str, low: int, high: int) -> None:
    gen = SceneGenerator(resolution=(64, 64), min_objects=low, max_objects=high, crop=view == "crop")
    restarts = []
    restart = gen._restarted
    gen._restarted = lambda count, rows, *at: restarts.append(len(rows)) or restart(count, rows, *at)
    counts, drawn = [], []
    for seed in range(10):
        counts.append(gen.generate(128, seed=seed).targets[:, :, -1].sum(1).long())
        drawn.append(torch.randint(low, high + 1, (128,), generator=torch.Generator().manual_seed(seed)))  # generate's
    counts, drawn = torch.cat(counts), torch.cat(drawn)                                                  # first draw
    per_count = torch.bincount(counts, minlength=high + 1)[low:].tolist()
    print(f"{view} {low}-{high}: {len(counts)} scenes, objects per scene {low}..{high}: {per_count}, "
          f"whole-scene restarts: {sum(restarts)}, scenes left short of their count: {int((counts < drawn).sum())}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
