"""How often the CLEVR-like generator restarts a whole scene (an object stayed hidden or found no place), and the
object counts it gives: CLEVR restarts such a scene with its count, so the counts stay uniform. From the project root:
    python .ci/scene-restarts.py full|crop MIN MAX   # 1280 scenes at 64x64 (10 batches of 128, seeds 0-9)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs.clevr import SceneGenerator  # noqa: E402


def main(view: str, low: int, high: int) -> None:
    gen = SceneGenerator(resolution=(64, 64), min_objects=low, max_objects=high, crop=view == "crop")
    laid = []
    layout = gen._layout
    gen._layout = lambda count, rng: laid.append(len(count)) or layout(count, rng)  # scenes laid out, restarts too
    counts = torch.cat([gen.generate(128, seed=seed).targets[:, :, -1].sum(1).long() for seed in range(10)])
    per_count = torch.bincount(counts, minlength=high + 1)[low:].tolist()
    print(f"{view} {low}-{high}: {len(counts)} scenes, objects per scene {low}..{high}: {per_count}, "
          f"whole-scene restarts: {sum(laid) - len(counts)}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
