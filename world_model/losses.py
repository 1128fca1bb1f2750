"""The Hungarian-matched set-prediction loss (the reconstruction losses are plain MSE, where they are used)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import hungarian_assign, trim_padding


def hungarian_match(cost: torch.Tensor) -> torch.Tensor:
    """Optimal assignment per image. cost `b k n` (k >= n) -> for each image and target, its slot: `b n`."""
    return torch.from_numpy(hungarian_assign(cost.detach().float().cpu().numpy())).to(cost.device)


def hungarian_huber_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot Attention's set loss: Huber cost (mean over the 19 entries) between every slot and every target
    row (padding rows included), Hungarian-matched, summed over targets, averaged over the batch.

    pred `b k 19`, target `b n 19` (zero-padded to k rows, or trimmed to k where the extra rows are padding)
    -> (loss, for each target row its slot `b k`). A non-finite prediction has no assignment: the loss is then the
    (non-finite) sum of all costs, which `guarded_update` skips, and target j is given slot j.
    """
    k = pred.shape[1]
    target = trim_padding(torch.as_tensor(target, device=pred.device), k)  # numpy targets too, as the metrics take
    n = target.shape[1]
    if n < k:
        target = F.pad(target, (0, 0, 0, k - n))
    diff = (pred.unsqueeze(2) - target.unsqueeze(1).to(pred.dtype)).abs()  # b k n 19
    cost = torch.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5).mean(-1)  # Huber, delta 1
    if not torch.isfinite(cost).all():  # the solver refuses NaN; the matching below syncs with the host anyway
        return cost.sum(), torch.arange(k, device=cost.device).expand(cost.shape[0], k)
    match = hungarian_match(cost)  # b k: target j <- slot match[:, j]
    matched = cost.gather(1, match.unsqueeze(1)).squeeze(1)  # b k(targets)
    return matched.sum(1).mean(), match
