"""What centring the features per image does to `SlotMixture` (world_model/slots/gmm.py): the same slots as the
steps on raw features in float64, the float32 error against float64 with and without a shared feature offset of 100,
and the time of a forward + backward pass, centred vs raw, side by side. The raw path is `SlotMixture.step` on the
uncentred features (center 0), which is the module's computation before centring. From the project root:
    python .ci/gmm-centring.py
"""
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from world_model.slots.gmm import SlotMixture, mixture_features  # noqa: E402

B, N, D, K, ITERS = 32, 1024, 64, 7, 3  # images, features per image (32x32), feature width, slots, iterations


def raw(m: SlotMixture, x: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """The slots from EM steps on the uncentred features."""
    with torch.autocast(x.device.type, enabled=False):
        h = mixture_features(m.project(m.norm_input(x)))
    mu, logsigma = init.split(m.dim, -1)
    log_pi = torch.full(init.shape[:2], -math.log(init.shape[1]), dtype=x.dtype)
    for _ in range(m.iters):
        mu, logsigma, log_pi, _ = m.step(h, mu, logsigma, log_pi)
    return torch.cat([mu, logsigma], -1)


def centred(m: SlotMixture, x: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    return m(x, init)[0]


def seconds(fn, m, x, init, repeats=10) -> float:
    for _ in range(2):
        fn(m, x, init).square().sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(m, x, init).square().sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.manual_seed(0)
    m = SlotMixture(D, K, D, iters=ITERS)
    x, init = torch.randn(B, N, D), m.initial_slots(B, "cpu").detach()
    with torch.no_grad():
        gap = (centred(m.double(), x.double(), init.double()) - raw(m, x.double(), init.double())).abs().max()
        print(f"float64, centred vs raw features: max |slot difference| {gap:.1e}")
        for offset in (0.0, 100.0):
            shifted = init.clone()
            shifted[..., :D] += offset
            m.norm_input.bias.add_(offset)
            for name, fn in (("centred", centred), ("raw", raw)):
                ref = fn(m.double(), x.double(), shifted.double())
                err = (fn(m.float(), x, shifted).double() - ref).abs().max()
                print(f"offset {offset:5.0f}, {name:7s} features: float32 max |slot error| vs float64 {err:.1e}")
            m.norm_input.bias.sub_(offset)
    times = {"centred": [], "raw": []}
    for _ in range(3):  # interleaved, the fastest of three
        for name, fn in (("centred", centred), ("raw", raw)):
            times[name].append(seconds(fn, m, x, init))
    c, r = min(times["centred"]), min(times["raw"])
    print(f"forward + backward, b={B} n={N} d={D} k={K}, {ITERS} iterations, {torch.get_num_threads()} threads: "
          f"centred {c * 1e3:.1f} ms, raw {r * 1e3:.1f} ms, centred/raw {c / r:.3f}")


if __name__ == "__main__":
    main()
