"""DreamerV3's symlog two-hot distribution for rewards and values.

A scalar x is represented on `num_bins` bins equally spaced in symlog space over [LOW, HIGH]: its
two-hot target puts weight on the two bins around symlog(x) so that their expectation is symlog(x)
exactly (values beyond the range are clipped to the end bins). Predicting it is a classification
(cross-entropy), which is robust to rewards of very different scales.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOW, HIGH = -20.0, 20.0
DEFAULT_BINS = 255


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


def bin_values(num_bins: int = DEFAULT_BINS, device=None) -> torch.Tensor:
    """The bins' positions in symlog space, `num_bins` float32 (symmetric: an odd count has 0 exactly)."""
    step = (HIGH - LOW) / (num_bins - 1)
    return (LOW + HIGH) / 2 + step * (torch.arange(num_bins, device=device) - (num_bins - 1) / 2)


def encode(x: torch.Tensor, num_bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Values `...` -> two-hot targets `... num_bins` (float32, rows sum to 1). A target: no gradient reaches x."""
    bins = bin_values(num_bins, x.device)
    y = symlog(x.detach().float()).clamp(LOW, HIGH)
    lo = (torch.bucketize(y, bins, right=True) - 1).clamp(0, num_bins - 2)  # bins[lo] <= y < bins[lo + 1]
    w_hi = ((y - bins[lo]) / (bins[lo + 1] - bins[lo])).clamp(0.0, 1.0)
    target = torch.zeros(*x.shape, num_bins, device=x.device)
    target.scatter_(-1, lo[..., None], (1.0 - w_hi)[..., None])
    target.scatter_add_(-1, (lo + 1)[..., None], w_hi[..., None])
    return target


def loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits `... bins` against the two-hot targets of x `...`; unreduced, `...`."""
    target = encode(x, logits.shape[-1])
    return -(target * F.log_softmax(logits.float(), -1)).sum(-1)


def mean(logits: torch.Tensor) -> torch.Tensor:
    """Logits `... bins` -> the predicted value `...`: symexp of the expected bin position."""
    probs = F.softmax(logits.float(), -1)
    return symexp((probs * bin_values(logits.shape[-1], logits.device)).sum(-1))
