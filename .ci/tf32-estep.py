"""How far TF32 matmuls would move the GMM E-step's log-likelihood logits (why CUDA runs keep fp32 matmuls at full
precision, `world_model.rundir.set_precision`). TF32 is simulated on the CPU by rounding both matmul inputs to its
10-bit mantissa; the reference is the direct (x - mu)^2 form in float64. From the project root:
    python .ci/tf32-estep.py
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from world_model.slots.gmm import component_coefs, mixture_features  # noqa: E402

D, N, K = 64, 1024, 8  # feature dims, points, components


def tf32(t: torch.Tensor) -> torch.Tensor:
    """Round to TF32's 10 explicit mantissa bits (round to nearest)."""
    mantissa, exponent = torch.frexp(t)
    return torch.ldexp(torch.round(mantissa * 2**11) / 2**11, exponent)


torch.manual_seed(0)
centers = torch.randn(K, D, dtype=torch.float64)
print(f"{'sigma':>6}{'fp32 max err':>14}{'tf32 max err':>14}  (nats, over {N} points x {K} components, {D} dims)")
for sigma in (0.3, 0.1, 0.03):
    x = centers[torch.randint(K, (N,))] + sigma * torch.randn(N, D, dtype=torch.float64)
    mu = centers + 0.5 * sigma * torch.randn(K, D, dtype=torch.float64)
    logsigma = torch.full((K, D), math.log(sigma), dtype=torch.float64)
    log_pi = torch.full((K,), -math.log(K), dtype=torch.float64)
    exact = -0.5 * ((x[:, None] - mu[None]) ** 2 / torch.exp(2 * logsigma)[None]).sum(-1) - logsigma.sum(-1) + log_pi
    h, c = mixture_features(x[None]), component_coefs(mu[None], logsigma[None], log_pi[None])
    fp32 = (h.float() @ c.float().transpose(1, 2))[0].double()
    rounded = (tf32(h.float()) @ tf32(c.float()).transpose(1, 2))[0].double()
    print(f"{sigma:>6}{(fp32 - exact).abs().max().item():>14.4g}{(rounded - exact).abs().max().item():>14.4g}")
