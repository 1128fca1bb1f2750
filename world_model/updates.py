"""What the three training loops (pretrain, train-wm, the agent) share in each update: bf16 autocast on CUDA, a
guarded optimizer step that skips non-finite losses and gradients, the learning-rate schedule, and the per-row means
of the update stats."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from envs.errors import UsageError

from . import distributed

SKIPPED_IN_A_ROW = 20  # non-finite updates in a row that stop a run: its weights give no finite loss any more

def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def guarded_update(loss: torch.Tensor, params: list, opt: torch.optim.Optimizer, grad_clip: float,
                   stats: dict) -> Optional[str]:
    """Backward, clip and step unless the loss or the gradient is non-finite: such an update never reaches the
    weights (or a checkpoint). Returns None, or what was non-finite ("loss" / "gradient"). Under DDP the
    gradient (all-reduced in backward) and hence the decision are the same on every rank."""
    opt.zero_grad(set_to_none=True)
    # Under torchrun every rank must take the same branch (backward all-reduces gradients), so ask all of them.
    if not distributed.all_true(bool(torch.isfinite(loss)), loss.device):
        return "loss"
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        return "gradient"
    opt.step()
    stats["grad_norm"] = grad_norm
    return None


class StepMeans:
    """Per-key means of the training stats (tensors or numbers) of the updates since the last log row, over their
    finite values. An update's tensor stats are stacked and summed as one vector where they live: a few kernels per
    update whatever the number of stats, and no host sync until the row. A skipped update's non-finite loss is
    counted apart, not averaged in; a key with no finite value since the last row is NaN (the logs leave it out),
    not an old value."""

    def __init__(self):
        self.vectors: dict = {}  # the keys of an update's tensor stats -> (sums `n`, counts `n`) of their finite values
        self.numbers: dict = {}  # key -> [sum, count] of the finite values of a stat given as a number

    def add(self, stats: dict) -> None:
        tensors = {k: v for k, v in stats.items() if isinstance(v, torch.Tensor)}
        for k, v in stats.items():
            if k not in tensors:
                total = self.numbers.setdefault(k, [0.0, 0])
                if math.isfinite(v):
                    total[0], total[1] = total[0] + v, total[1] + 1
        if tensors:
            values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()])  # n
            finite = torch.isfinite(values)
            total, count = self.vectors.get(tuple(tensors), (0.0, 0.0))
            if isinstance(total, torch.Tensor) and total.device != values.device:  # restored from a checkpoint
                total, count = total.to(values.device), count.to(values.device)
            self.vectors[tuple(tensors)] = (total + torch.where(finite, values, 0.0), count + finite.float())

    def state_dict(self) -> dict:
        """The sums and counts of the updates since the last row, as they are held (a host copy), which a checkpoint
        keeps: a resumed run's next row then covers the same updates as the uninterrupted run's, not only those
        after the checkpoint, and sums them in the same order and precision."""
        vectors = [[list(keys), total.tolist(), count.tolist()] for keys, (total, count) in self.vectors.items()]
        return {"numbers": {k: list(v) for k, v in self.numbers.items()}, "vectors": vectors}

    def load_state_dict(self, state: dict) -> None:
        self.numbers = {k: list(v) for k, v in state.get("numbers", {}).items()}
        self.vectors = {tuple(keys): (torch.tensor(total, dtype=torch.float32),  # as they were summed
                                      torch.tensor(count, dtype=torch.float32))
                        for keys, total, count in state.get("vectors", [])}

    def pop(self) -> dict:
        sums = {k: list(v) for k, v in self.numbers.items()}
        for keys, (total, count) in self.vectors.items():
            for k, t, c in zip(keys, total.tolist(), count.tolist()):  # one host copy per key set
                s = sums.setdefault(k, [0.0, 0])
                s[0], s[1] = s[0] + t, s[1] + c
        self.vectors, self.numbers = {}, {}
        return {k: t / c if c else math.nan for k, (t, c) in sums.items()}


def tally_update(problem: Optional[str], stats: dict, means: StepMeans, skipped: int, step: int, logger,
                 bar) -> int:
    """After `guarded_update`: a skipped update (`problem`) is counted, logged (`train/skipped_updates`) and said
    above the progress bar, at `step`, the update's number from 1 (as the log rows count); a good one's stats join
    the means of the next log row. Returns the skipped count."""
    if not problem:
        means.add(stats)
        return skipped
    skipped += 1
    logger.scalars(step, {"skipped_updates": skipped}, prefix="train/")
    if distributed.is_main():
        bar.write(f"step {step}: non-finite {problem}, update skipped ({skipped} so far)")
    return skipped


class Diverged(UsageError):
    """Training diverged: update after update gave a non-finite loss or gradient (a one-line error)."""


class SkipStreak:
    """Counts the updates skipped in a row (`guarded_update`); SKIPPED_IN_A_ROW of them raise Diverged, naming
    the learning rate to lower (`lr`, e.g. "train.lr=0.0004"), rather than train on without learning (or crash
    where a diverged model's output is first used). Under torchrun every rank skips alike, so all raise alike."""

    def __init__(self, what: str, lr: str):
        self.what, self.lr, self.count = what, lr, 0

    def __call__(self, problem: Optional[str], step: int) -> None:
        """After update number `step` (from 1): `problem` is what `guarded_update` found non-finite, or None."""
        self.count = self.count + 1 if problem else 0
        if self.count >= SKIPPED_IN_A_ROW:
            raise Diverged(f"{self.what} diverged: its last {self.count} updates (to update {step}) gave a non-finite "
                           f"{problem} and were skipped; lower {self.lr}, and train again (a resume starts from "
                           "its last checkpoint, whose weights may have diverged already)")


def lr_factor(step: int, warmup: int, decay_rate: float = 1.0, decay_steps: int = 1) -> float:
    """The learning rate's factor at `step`: linear warmup over `warmup` steps, times a smooth exponential decay, by
    `decay_rate` per `decay_steps` steps (Slot Attention's schedule; the world model warms up only)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return warm * decay_rate ** (step / decay_steps)
