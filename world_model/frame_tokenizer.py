"""The frame token: a few categorical codes for the whole frame, beside the slots.

Slots describe objects; what is not an object (Crafter's inventory and health bars, NetHack's status,
lighting) would be lost without a global token (OC-STORM adds one). The frame is encoded by a small
CNN into `vars` categorical latents (sampled in training, argmax in evaluation; straight-through
gradients through a softmax with 1% uniform mixing, as DreamerV3),
trained to reconstruct a low-resolution copy of the frame, so the dynamics model can predict and feed
back the codes in imagination exactly like slot codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FrameTokenizerConfig:
    vars: int = 8  # categorical latents per frame (0 disables the frame token)
    codes: int = 16  # classes per latent
    channels: int = 32  # CNN width (doubles per stride-2 layer)
    target: int = 16  # side of the low-resolution reconstruction target
    unimix: float = 0.01


class FrameTokenizer(nn.Module):
    """images `b 3 h w` in [0, 1] -> codes `b g`; decodes codes to a `target`-pixel frame."""

    def __init__(self, cfg: FrameTokenizerConfig, resolution: int):
        super().__init__()
        if resolution % 8:
            raise ValueError(f"frame tokenizer needs a resolution divisible by 8, got {resolution}")
        self.cfg = cfg
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
        return self.encoder(images).unflatten(-1, (self.cfg.vars, self.cfg.codes)).float()

    def onehots(self, logits: torch.Tensor) -> torch.Tensor:
        """Straight-through one-hots (`b g c`): sampled codes in training (which keeps every code in play),
        argmax codes in evaluation; gradients flow through the uniform-mixed softmax."""
        probs = (1 - self.cfg.unimix) * logits.softmax(-1) + self.cfg.unimix / self.cfg.codes
        if self.training:
            index = torch.multinomial(probs.flatten(0, -2), 1).view(probs.shape[:-1])
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

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes used (`b g`) and the reconstruction loss of the low-resolution frame."""
        onehots = self.onehots(self.logits(images))
        recon = self.decode(onehots)
        return onehots.argmax(-1), F.mse_loss(recon.float(), self.target(images))
