"""The frame token: a few categorical codes for the whole frame, beside the slots.

Slots describe objects; what is not an object (Crafter's inventory and health bars, NetHack's status,
lighting) would be lost without a global token (OC-STORM adds one). The frame is encoded by a small
CNN into `vars` categorical latents (sampled in training, argmax in evaluation; straight-through
gradients through a softmax with 1% uniform mixing, as DreamerV3),
trained to reconstruct a low-resolution copy of the frame, so the dynamics model can predict and feed
back the codes in imagination exactly like slot codes.

An env may give status tokens beside its frames (`obs["status"]`: NetHack's bottom line, hit points, hunger,
depth, ..., which its frames do not show, binned into categorical values): they are appended to the frame
codes as they are, not learned, so the dynamics predicts them and the actor reads them like the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from envs import STATUS_LEVELS
from envs.errors import UsageError


def status_vars(spec: dict) -> int:
    """How many status tokens an env gives beside its frames (observation key "status": NetHack's bottom line), from
    an observation spec {key: (shape, dtype)}; 0 for none."""
    return int(math.prod(spec["status"][0])) if "status" in spec else 0


def frame_token_size(frame: "FrameTokenizerConfig", status_vars: int) -> tuple[int, int, int]:
    """For an env with `status_vars` status tokens: those the frame token reads (none when frame.vars=0 or
    frame.status=false), and the dynamics' frame_vars and frame_codes (one vocabulary for the learned codes and the
    status tokens' values)."""
    status = status_vars if frame.vars and frame.status else 0
    return status, frame.vars + status, max(frame.codes, STATUS_LEVELS) if status else frame.codes


@dataclass
class FrameTokenizerConfig:
    vars: int = 8  # categorical latents per frame (0 disables the frame token)
    codes: int = 16  # classes per latent
    channels: int = 32  # CNN width (doubles per stride-2 layer)
    target: int = 16  # side of the low-resolution reconstruction target
    unimix: float = 0.01
    status: bool = True  # append the env's status tokens (obs["status"], NetHack's bottom line) to the codes (vars > 0)


class FrameTokenizer(nn.Module):
    """images `b 3 h w` in [0, 1] (and status tokens `b m` for `status_vars` = m > 0) -> codes `b g+m`, the `g`
    learned ones first; decodes learned codes to a `target`-pixel frame."""

    def __init__(self, cfg: FrameTokenizerConfig, resolution: int, status_vars: int = 0):
        super().__init__()
        if resolution % 8:
            raise UsageError(f"frame tokenizer needs a resolution divisible by 8, got {resolution}")
        self.cfg, self.status_vars = cfg, status_vars
        c = cfg.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.SiLU(), nn.Conv2d(c, 2 * c, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.SiLU(), nn.Flatten(),
            nn.Linear(4 * c * (resolution // 8) ** 2, cfg.vars * cfg.codes))
        side = cfg.target // 4
        self.decoder = nn.Sequential(
            nn.Linear(cfg.vars * cfg.codes, 4 * c * side * side), nn.SiLU(), nn.Unflatten(1, (4 * c, side, side)),
            nn.ConvTranspose2d(4 * c, 2 * c, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(2 * c, 3, 4, 2, 1))

    def logits(self, images: torch.Tensor) -> torch.Tensor:  # b g c
        """The codes' logits, the last layer in fp32 under autocast: bf16 rounding would flip near-tied codes, and
        the dynamics would learn bf16 codes in training and be scored on fp32 ones in evaluation."""
        features = self.encoder[:-1](images)
        with torch.autocast(images.device.type, enabled=False):
            return self.encoder[-1](features.float()).unflatten(-1, (self.cfg.vars, self.cfg.codes))

    def onehots(self, logits: torch.Tensor) -> torch.Tensor:
        """Straight-through one-hots (`b g c`): sampled codes in training (which keeps every code in play),
        argmax codes in evaluation; gradients flow through the uniform-mixed softmax."""
        probs = (1 - self.cfg.unimix) * logits.softmax(-1) + self.cfg.unimix / self.cfg.codes
        if self.training:  # weights that diverged give NaN: drawn from as uniform, the loss (NaN) skips the update
            drawn = torch.where(torch.isfinite(probs), probs, 1.0)
            index = torch.multinomial(drawn.flatten(0, -2), 1).view(probs.shape[:-1])
        else:
            index = probs.argmax(-1)
        hard = F.one_hot(index, self.cfg.codes).to(probs.dtype)
        return hard + probs - probs.detach()

    def decode(self, onehots: torch.Tensor) -> torch.Tensor:
        """`b g c` (one-hots, or integer codes `b g`) -> low-resolution frames `b 3 t t`."""
        if onehots.dtype in (torch.int64, torch.int32):
            onehots = F.one_hot(onehots.long(), self.cfg.codes).float()
        return self.decoder(onehots.flatten(1))

    def target(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images.float(), size=(self.cfg.target, self.cfg.target), mode="area")

    def with_status(self, codes: torch.Tensor, status: Optional[torch.Tensor]) -> torch.Tensor:
        """Learned codes `b g` -> `b g+m`, the status tokens `b m` appended."""
        if not self.status_vars:
            return codes
        if status is None or status.shape[-1] != self.status_vars:
            got = "none" if status is None else f"{status.shape[-1]}"
            raise ValueError(f"this frame tokenizer appends the env's {self.status_vars} status tokens to its codes; "
                             f"got {got}")
        return torch.cat([codes, status.to(codes.dtype)], -1)

    def codes(self, images: torch.Tensor, status: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The argmax codes `b g+m` (acting)."""
        return self.with_status(self.logits(images).argmax(-1), status)

    def forward(self, images: torch.Tensor, status: Optional[torch.Tensor] = None,
                reduce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The argmax codes (`b g+m`), as acting reads them, and the reconstruction loss of the low-resolution frame
        decoded from the straight-through one-hots (sampled in training): its mean, or each frame's (`b`) without
        `reduce`. The dynamics learns to predict these codes, so its targets carry no sampling noise."""
        logits = self.logits(images)
        recon = self.decode(self.onehots(logits))
        loss = F.mse_loss(recon.float(), self.target(images), reduction="none").flatten(1).mean(1)
        return self.with_status(logits.argmax(-1), status), loss.mean() if reduce else loss
