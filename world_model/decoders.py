"""Slot decoders: the spatial-broadcast mask decoder (object discovery) and the set-prediction head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from envs.errors import UsageError

from .backbone import SoftPositionEmbed
from .metrics import CLEVR_ELEMENT_SIZE


@dataclass
class Decoded:
    recon: torch.Tensor  # b 3 h w, mixture of the slots' RGB by their masks
    rgb: torch.Tensor  # b k 3 h w, each slot's RGB
    masks: torch.Tensor  # b k 1 h w, softmax over slots


class SpatialBroadcastDecoder(nn.Module):
    """Broadcast each slot over a small grid, add positions, upsample x2 with transposed convs to the image
    size, and emit per-slot RGB + mask logits; masks are normalized across slots."""

    def __init__(self, slot_dim: int, resolution: int, channels: int = 64, init_size: int = 8):
        super().__init__()
        ups, size = 0, init_size
        while size < resolution:
            size *= 2
            ups += 1
        if size != resolution:
            raise UsageError(f"decoder: resolution {resolution} is not decoder_init={init_size} times a power of 2")
        self.init_size = init_size
        self.pos = SoftPositionEmbed(slot_dim)
        layers, c_in = [], slot_dim
        for _ in range(ups):
            layers += [nn.ConvTranspose2d(c_in, channels, 5, stride=2, padding=2, output_padding=1), nn.ReLU(inplace=True)]
            c_in = channels
        layers += [nn.Conv2d(c_in, channels, 5, padding=2), nn.ReLU(inplace=True), nn.Conv2d(channels, 4, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, slots: torch.Tensor) -> Decoded:
        """slots `b k d` -> each slot's rgb `b k 3 h w` and masks `b k 1 h w` (softmax over slots), and their blend."""
        b, k, d = slots.shape
        x = slots.reshape(b * k, 1, 1, d).expand(-1, self.init_size, self.init_size, -1)
        x = rearrange(self.pos(x), "bk h w d -> bk d h w")
        out = rearrange(self.net(x), "(b k) c h w -> b k c h w", b=b)
        rgb, logits = out[:, :, :3], out[:, :, 3:]
        masks = logits.float().softmax(dim=1)
        recon = (masks * rgb.float()).sum(dim=1)
        return Decoded(recon=recon, rgb=rgb, masks=masks)


class SetPredictionHead(nn.Module):
    """Per-slot MLP to the 19 CLEVR property entries, all squashed by a sigmoid (as Slot Attention)."""

    def __init__(self, slot_dim: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, CLEVR_ELEMENT_SIZE))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:  # b k d -> b k 19
        return torch.sigmoid(self.mlp(slots).float())
